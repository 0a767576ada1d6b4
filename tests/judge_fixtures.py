"""A local chat-completions endpoint for the judge's tests."""

import http.server
import json
import threading


class FakeJudgeServer:
  """A local chat-completions endpoint: replies with `replies` in turn (an int is an HTTP error
  status; ("redirect", url) a 302 to url) and records each request's path, headers and JSON body
  (None for a GET, which is how urllib follows a redirected POST)."""

  def __init__(self, replies):
    self.replies, self.seen = list(replies), []
    outer = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_GET(self):
        self._reply(None)

      def do_POST(self):
        self._reply(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

      def _reply(self, body):
        outer.seen.append((self.path, dict(self.headers), body))
        reply = outer.replies.pop(0)
        if isinstance(reply, int):
          self.send_response(reply)
          self.end_headers()
          return
        if isinstance(reply, tuple):
          self.send_response(302)
          self.send_header("Location", reply[1])
          self.end_headers()
          return
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(data.encode())

      def log_message(self, *args):
        pass

    self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
    threading.Thread(target=self.server.serve_forever, daemon=True).start()

  def close(self):
    self.server.shutdown()
    self.server.server_close()
