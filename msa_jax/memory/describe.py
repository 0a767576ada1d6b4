"""A human-readable summary of a bank (what `tools/inspect_bank.py` prints)."""

from __future__ import annotations

from msa_jax.memory.bank import Bank, chunk_bytes


def describe(bank: Bank, num_docs: int = 3, text_chars: int = 80) -> str:
  """Manifest summary, counts, per-array shapes and dtypes, and the first `num_docs` documents."""
  m = bank.manifest
  model, msa = m.configs()
  lines = [
      f"bank {bank.path}",
      f"  format version {m.format_version}; {'complete' if m.complete else 'INTERRUPTED encode'}"
      f"; created {m.created}, updated {m.updated}",
      f"  model fingerprint {m.fingerprint}",
      f"  model: {model.num_layers} layers, hidden {model.hidden_size}, {model.num_kv_heads} KV "
      f"heads x {model.head_dim}, compute {model.compute_dtype}",
      f"  MSA: router layers {list(m.router_layers)}, chunk size P={m.chunk_size}, score mode "
      f"{m.score_mode}, top-k {msa.top_k_docs}",
      f"  {m.num_docs:,} documents, {m.num_chunks:,} chunks, {m.text_bytes:,} text bytes, "
      f"{chunk_bytes(m) / 2**20:,.1f} MiB of chunk arrays and text",
      "  arrays:",
  ]
  for name, (shape, dtype) in bank.array_shapes().items():
    lines.append(f"    {name:<18} {str(shape):<22} {dtype:<9} "
                 f"{len(m.checksums.get(name, []))} checksummed segments")
  for i in range(min(num_docs, bank.num_docs)):
    start, stop = bank.doc_chunks(i)
    text = bank.document_text(i)
    shown = text if len(text) <= text_chars else text[:text_chars] + "..."
    lines.append(f"  doc {i} [id {int(bank.display_ids[i])}] chunks [{start}, {stop}): {shown!r}")
  return "\n".join(lines)
