"""Synthetic memory tasks and the world tokenizer: determinism, well-formed records, memory budgets,
exact tokenizer round trips."""

import os
import re

import numpy as np
import pytest

from msa_jax.data import prompt_format as pf
from msa_jax.data.records import Record
from msa_jax.data.synthetic import (TASKS, build_world_tokenizer, count_tokens, default_length_fn,
                                    generate, generate_mix, pick_task, save_world_tokenizer,
                                    world_tokenizer)
from msa_jax.data.synthetic import memory_pool, tasks, world
from msa_jax.data.tokenizer import Tokenizer
from msa_jax.data.transcript import document_ids, document_length_fn

TOK = world_tokenizer()
MEMORY = 3000
SMALL = dict(memory_tokens=MEMORY, min_doc_tokens=16, max_doc_tokens=200)
NEEDLE_RE = re.compile(r"The special magic number for (\w+ \w+) is: (\d+)\.")


def n_tokens(text):
  return len(TOK.encode(text))


def wrapped_total(record):
  return sum(n_tokens(pf.wrap_document(i, d)) for i, d in enumerate(record.documents))


def subject(doc):
  """The entity a fact card is about (its leading `First Last.`)."""
  m = re.match(r"(\w+ \w+)\.", doc)
  return m.group(1) if m else None


def check_memory(record, memory_tokens, max_doc_tokens, min_doc_tokens=16):
  total = wrapped_total(record)
  assert total <= memory_tokens
  # filled: the first distractor that did not fit is at most a max-length document
  assert total > memory_tokens - (max_doc_tokens + 20)
  for d in record.documents:
    assert min_doc_tokens <= n_tokens(d) <= max_doc_tokens, d


# --- determinism ----------------------------------------------------------------------------------

@pytest.mark.parametrize("task", sorted(TASKS))
def test_same_seed_and_index_give_the_same_record(task):
  a = generate(task, 3, 7, **SMALL)
  generate(task, 3, 8, **SMALL)  # other records in between change nothing
  assert generate(task, 3, 7, **SMALL) == a
  assert isinstance(a, Record) and a.task == task
  assert generate(task, 3, 8, **SMALL) != a
  assert generate(task, 4, 7, **SMALL) != a


def test_bad_seed_and_unknown_task_are_errors():
  with pytest.raises(ValueError, match="seed must be a non-negative int"):
    generate("fact_lookup", -1, 0)
  with pytest.raises(ValueError, match="unknown synthetic task 'nope'"):
    generate("nope", 0, 0)


# --- well-formedness ------------------------------------------------------------------------------

def test_fact_lookup_records():
  for index in range(12):
    r = generate("fact_lookup", 0, index, **SMALL)
    check_memory(r, MEMORY, 200)
    m = re.fullmatch(r"What is the ([a-z ]+) of (\w+ \w+)\?", r.question)
    attr, name = m.groups()
    assert attr in world.ATTRIBUTES and r.answer in world.ATTRIBUTES[attr]
    assert len(r.hops) == 1 and len(r.hops[0]) == 1
    gold = r.documents[r.hops[0][0]]
    assert subject(gold) == name and f" {attr}: {r.answer}." in gold
    others = [d for i, d in enumerate(r.documents) if i != r.hops[0][0]]
    assert others and all(subject(d) != name and name not in d for d in others)
    subjects = [subject(d) for d in r.documents]
    assert None not in subjects and len(set(subjects)) == len(subjects)  # distinct entities
    n_attrs = [gold.count(": ") for gold in r.documents]
    assert max(n_attrs) <= 5
  assert len({generate("fact_lookup", 0, i, **SMALL).hops[0][0] for i in range(12)}) > 3


def test_fact_lookup_short_cards_keep_the_asked_attribute():
  r = generate("fact_lookup", 1, 2, memory_tokens=600, min_doc_tokens=16, max_doc_tokens=16)
  assert all(n_tokens(d) == 16 for d in r.documents)
  attr, name = re.fullmatch(r"What is the ([a-z ]+) of (\w+ \w+)\?", r.question).groups()
  assert f" {attr}: {r.answer}." in r.documents[r.hops[0][0]]
  assert wrapped_total(r) <= 600 and len(r.documents) > 15


def test_multi_hop_records():
  seen_hops = set()
  for index in range(24):
    r = generate("multi_hop", 0, index, **SMALL)
    check_memory(r, MEMORY, 200)
    seen_hops.add(len(r.hops))
    assert 2 <= len(r.hops) <= 4 and all(len(h) == 1 for h in r.hops)
    parts = r.question[len("What is the "):-1].split(" of ")
    attr, relations, e0 = parts[0], [p[len("the "):] for p in parts[1:-1]][::-1], parts[-1]
    assert attr in world.ATTRIBUTES and len(relations) == len(r.hops) - 1
    chain_docs = [r.documents[h[0]] for h in r.hops]
    chain = [subject(d) for d in chain_docs]
    assert chain[0] == e0 and len(set(chain)) == len(chain)
    for j, rel in enumerate(relations):  # each hop's document names the next entity
      assert f" {rel}: {chain[j + 1]}." in chain_docs[j]
      assert chain_docs[j].count(f" {rel}: ") == 1
    assert f" {attr}: {r.answer}." in chain_docs[-1]
    gold_ids = {h[0] for h in r.hops}
    for i, d in enumerate(r.documents):
      if i not in gold_ids:
        assert subject(d) not in chain and not any(e in d for e in chain)
  assert seen_hops == {2, 3, 4}
  assert len(generate("multi_hop", 0, 0, num_hops=4, **SMALL).hops) == 4


def _needles(doc):
  return NEEDLE_RE.findall(doc)


@pytest.mark.parametrize("task", ["niah_single", "niah_multi_key", "niah_multi_value",
                                  "niah_multi_query"])
def test_niah_records(task):
  for index in range(6):
    r = generate(task, 0, index, **SMALL)
    check_memory(r, MEMORY, 200)
    assert len(r.hops) == 1 and list(r.hops[0]) == sorted(r.hops[0])
    gold = r.hops[0]
    listed = r.question[r.question.index(" for ") + 5:r.question.index(" mentioned")]
    keys = re.split(r", | and ", listed)
    needles = {i: _needles(d) for i, d in enumerate(r.documents)}
    assert all(len(needles[g]) == 1 and needles[g][0][0] in keys for g in gold)
    for i, d in enumerate(r.documents):  # asked keys appear only in gold documents
      if i not in gold:
        assert not any(k in d for k in keys)
    values = [needles[g][0][1] for g in gold]
    assert all(4 <= len(v) <= 7 and v[0] != "0" for v in values)
    all_needles = [n for i in sorted(needles) for n in needles[i]]
    if task == "niah_single":
      assert len(gold) == 1 and len(all_needles) == 1 and r.answer == values[0]
      assert r.question.startswith("What is the special magic number for ")
    elif task == "niah_multi_key":
      assert len(gold) == 1 and r.answer == values[0] and len(keys) == 1
      assert len(all_needles) == 4 and len({k for k, _ in all_needles}) == 4
    elif task == "niah_multi_value":
      assert len(keys) == 1 and len(gold) == 4 == len(all_needles)
      assert r.answer == ", ".join(values)  # in document order
    else:
      assert len(keys) == len(gold) == 4 == len(all_needles)
      by_key = dict(all_needles)
      assert r.answer == ", ".join(by_key[k] for k in keys)  # in the question's order
  assert len({generate(task, 0, i, **SMALL).hops for i in range(6)}) > 1


def _is_fact_card(doc):
  m = re.match(r"\w+ \w+\. ([\w ]+): ", doc)  # `First Last. attribute: value. ...`
  return m is not None and m[1] in world.ATTRIBUTE_NAMES


@pytest.mark.parametrize("task", ["niah_single", "niah_multi_key", "niah_multi_value",
                                  "niah_multi_query"])
def test_niah_card_distractors(task):
  """card_distractors = p makes about a share p of a needle memory's distractors fact cards of
  people other than the keys (`Name. attr: value. ...`), the rest haystack prose; the needles,
  question and answer values stay those of the task; p = 0 draws nothing more (the record is unchanged
  by the option's existence: a plain call gives the same record)."""
  small = dict(SMALL, memory_tokens=8192, max_doc_tokens=64)
  assert generate(task, 3, 0, card_distractors=0.0, **small) == generate(task, 3, 0, **small)
  cards, distractors = 0, 0
  for index in range(4):
    r = generate(task, 3, index, card_distractors=0.5, **small)
    check_memory(r, 8192, 64)
    listed = r.question[r.question.index(" for ") + 5:r.question.index(" mentioned")]
    keys = set(re.split(r", | and ", listed))
    needles = [n for d in r.documents for n in _needles(d)]
    assert {k for k, _ in needles} >= keys
    plain = generate(task, 3, index, **small)
    assert r.question == plain.question  # multi-value answers follow the document order
    assert sorted(r.answer.split(", ")) == sorted(plain.answer.split(", "))
    for i, d in enumerate(r.documents):
      if i in r.hops[0]:
        continue
      distractors += 1
      if _is_fact_card(d):
        cards += 1
        assert tasks.card_subject(d) not in keys and not _needles(d)
  assert distractors > 200 and 0.4 < cards / distractors < 0.6
  with pytest.raises(ValueError, match=r"card_distractors must be a number in \[0, 1\), got 1.0"):
    generate(task, 3, 0, card_distractors=1.0, **small)


def test_memory_budget_errors_and_caps():
  with pytest.raises(ValueError, match="gold/required documents take .* memory_tokens=40"):
    generate("niah_multi_value", 0, 0, memory_tokens=40)
  with pytest.raises(ValueError, match="max_doc_tokens=11 is below the 12 tokens"):
    generate("fact_lookup", 0, 0, min_doc_tokens=4, max_doc_tokens=11)
  with pytest.raises(ValueError, match="max_doc_tokens=17 is below the 18 tokens"):
    generate("niah_single", 0, 0, max_doc_tokens=17)
  with pytest.raises(ValueError, match="max_docs=2"):
    generate("multi_hop", 0, 0, num_hops=3, max_docs=2)
  r = generate("fact_lookup", 0, 0, memory_tokens=50_000, max_docs=5)
  assert len(r.documents) == 5
  # gold documents are kept within an even share of a small memory, so this never raises
  for i in range(20):
    assert wrapped_total(generate("niah_multi_query", 0, i, memory_tokens=700)) <= 700


@pytest.mark.parametrize("align_to", [8, 64])
def test_aligned_gold_documents_leave_room_for_their_padding(align_to):
  """With the aligned layout's exact length, gold documents still fit their even share of a small
  memory (at P=64, without `align_to` some would not), and align_to=0 is the official record."""
  length = document_length_fn(TOK, align_to)
  for task in ("multi_hop", "niah_multi_key", "niah_multi_query"):
    for i in range(20):
      r = generate(task, 0, i, memory_tokens=512, max_doc_tokens=256, length_fn=length,
                   align_to=align_to)
      total = sum(len(document_ids(TOK, k, d, align_to)) for k, d in zip(r.doc_ids, r.documents))
      assert total <= 512, (task, i)
  assert generate("multi_hop", 0, 3, align_to=0, **SMALL) == generate("multi_hop", 0, 3, **SMALL)
  with pytest.raises(ValueError, match="align_to must be an int >= 0"):
    generate("fact_lookup", 0, 0, align_to=-1)


def test_aligned_memory_pool_levels_fit_their_size():
  align_to = 64
  length = document_length_fn(TOK, align_to)
  pool = memory_pool.build_pool(6000, num_single=3, num_multi=1, seed=0, length_fn=length,
                                max_doc_tokens=128, align_to=align_to)
  for size in (3000, 6000):
    level = memory_pool.level(pool, size, seed=0, length_fn=length)
    ids = [document_ids(TOK, k, t, align_to) for k, t in zip(level.display_ids, level.texts)]
    assert level.tokens == sum(map(len, ids)) <= size
    assert level.tokens > 0.8 * size  # filled, not tiny


def test_memory_pool_needle_questions_have_one_needle_each():
  # past the world's 3,600 people the pool fills with haystacks (the odd one with a needle)
  pool = memory_pool.build_pool(200_000, num_single=1, num_multi=0, num_needle=3, seed=0,
                                length_fn=default_length_fn(), max_doc_tokens=64)
  needles = [q for q in pool.questions if q.task == "niah_single"]
  assert len(needles) == 3 and len(pool.questions) == 4
  found = [(m.group(1), m.group(2), i) for i, d in enumerate(pool.documents)
           for m in NEEDLE_RE.finditer(d)]
  subjects = {subject(d) for d in pool.documents}
  for q in needles:
    key = re.search(r"number for (\w+ \w+) mentioned", q.question).group(1)
    assert [(v, i) for k, v, i in found if k == key] == [(q.answer, q.hops[0][0])]
    assert key not in subjects  # no card is about the needle's key either
  level = memory_pool.level(pool, 100_000, seed=0, length_fn=default_length_fn())
  for q in level.questions:  # a smaller level still holds every gold needle
    if q.task == "niah_single":
      assert f"for {q.question.split('for ')[1].split(' mentioned')[0]} is: {q.answer}." in \
          level.texts[level.gold_ids(q)[0]]


def test_custom_length_fn_is_respected():
  chars = lambda wrapped: len(wrapped)  # e.g. a budget in characters
  r = generate("fact_lookup", 0, 1, memory_tokens=5000, length_fn=chars, max_doc_tokens=100)
  total = sum(len(pf.wrap_document(i, d)) for i, d in enumerate(r.documents))
  assert total <= 5000 and len(r.documents) > 5


def test_default_length_fn_matches_the_tokenizer():
  fn = default_length_fn()
  for task in TASKS:
    r = generate(task, 2, 0, **SMALL)
    for i, d in enumerate(r.documents):
      w = pf.wrap_document(i, d)
      assert fn(w) == n_tokens(w) == count_tokens(d) + 7 + 2 * len(str(i))


def test_64k_record_fills_its_memory():
  r = generate("fact_lookup", 0, 1, memory_tokens=65536)
  assert 0.95 * 65536 <= wrapped_total(r) <= 65536 and len(r.documents) > 60


# --- mixes ----------------------------------------------------------------------------------------

def test_generate_mix():
  weights = {"fact_lookup": 2.0, "multi_hop": 1.0, "niah_single": 1.0, "niah_multi_key": 0.0}
  picks = [pick_task(weights, 5, i) for i in range(400)]
  assert picks == [pick_task(dict(reversed(weights.items())), 5, i) for i in range(400)]
  assert "niah_multi_key" not in picks
  assert 150 < picks.count("fact_lookup") < 250 and picks.count("multi_hop") > 60
  for i in range(4):
    r = generate_mix(weights, 5, i, num_hops=2, **SMALL)  # num_hops goes to multi_hop only
    assert r.task == picks[i] and r == generate(picks[i], 5, i, **(
        dict(SMALL, num_hops=2) if picks[i] == "multi_hop" else SMALL))
  with pytest.raises(TypeError, match="num_values"):
    generate_mix(weights, 5, 0, num_values=3)
  with pytest.raises(ValueError, match="unknown synthetic task"):
    pick_task({"bogus": 1.0}, 0, 0)
  with pytest.raises(ValueError, match="positive sum"):
    pick_task({"fact_lookup": 0.0}, 0, 0)


# --- tokenizer ------------------------------------------------------------------------------------

def _prompt_strings(record):
  ids = list(record.gold_ids)
  return [pf.question_text(record.question), pf.restatement(record.question),
          pf.round_ids(ids), pf.injected_documents([(i, record.documents[i]) for i in ids]),
          pf.injection_end(),
          pf.final_answer(record.answer), pf.TEMPLATE_HEAD, pf.TEMPLATE_TAIL, pf.ANSWER_PREFIX,
          pf.END_OF_RETRIEVE, pf.TEMPLATE_HEAD + pf.question_text(record.question) +
          pf.TEMPLATE_TAIL + pf.round_ids(ids) + pf.END_OF_RETRIEVE]


def test_tokenizer_round_trips_everything_generated():
  unk = TOK._tok.token_to_id("<unk>")
  for task in TASKS:
    for index in range(3):
      r = generate(task, 9, index, **SMALL)
      texts = [pf.wrap_document(i, d) for i, d in enumerate(r.documents)]
      texts += list(r.documents) + [r.question, r.answer] + _prompt_strings(r)
      for text in texts:
        ids = TOK.encode(text)
        assert unk not in ids, text
        assert TOK.decode(ids) == text


def test_tokenizer_special_tokens_digits_and_size():
  assert TOK.vocab_size < 1024
  assert len(TOK.encode(pf.TEMPLATE_HEAD)) == 3
  TOK.require_msa_tokens()
  end = TOK.token_id(pf.END_OF_RETRIEVE)
  assert TOK.encode(pf.END_OF_RETRIEVE) == [end]
  assert TOK.encode(pf.round_ids([3])) == TOK.encode("[3]") + [TOK.object_ref_end_id]
  assert len(TOK.encode("[123]")) == 5 and len(TOK.encode("9081726")) == 7
  assert TOK.decode(TOK.encode("[123]")) == "[123]"
  assert TOK.pad_id == TOK.token_id("<|endoftext|>")
  assert TOK.decode(TOK.encode("<|im_start|>user\nhi"), skip_special_tokens=True) == "user\n<unk>"
  # every word of the world is one token, with and without its leading space where needed
  for w in world.all_words():
    assert len(TOK.encode(" " + w)) == 1
  for w in world.bare_words():
    assert len(TOK.encode(w)) == 1
  assert build_world_tokenizer().get_vocab() == TOK._tok.get_vocab()  # built deterministically


def test_save_and_load_world_tokenizer(tmp_path):
  path = save_world_tokenizer(str(tmp_path))
  assert path == str(tmp_path / "tokenizer.json") and os.listdir(tmp_path) == ["tokenizer.json"]
  loaded = Tokenizer.from_file(str(tmp_path))
  other = Tokenizer.from_file(save_world_tokenizer(str(tmp_path / "sub" / "tok.json")))
  r = generate("multi_hop", 1, 1, **SMALL)
  text = pf.TEMPLATE_HEAD + "".join(pf.wrap_document(i, d) for i, d in enumerate(r.documents))
  assert loaded.encode(text) == TOK.encode(text) == other.encode(text)
  assert loaded.decode(loaded.encode(text)) == text
  assert loaded.vocab_size == TOK.vocab_size


def _near(name, other):
  """Whether two `First Last` names share their first or their last name."""
  (f, l), (g, m) = name.split(), other.split()
  return name != other and (f == g or l == m)


@pytest.mark.parametrize("task", ["fact_lookup", "multi_hop"])
def test_name_negatives_put_near_namesakes_in_the_memory(task):
  """With name_negatives=n at least n distractors share a first or last name with a gold subject
  (a random memory of this size holds about 1-4); n=0 is the default record itself."""
  for index in range(6):
    plain = generate(task, 3, index, **SMALL)
    assert generate(task, 3, index, name_negatives=0, **SMALL) == plain
    r = generate(task, 3, index, name_negatives=12, **SMALL)
    check_memory(r, MEMORY, 200)
    gold = {subject(r.documents[i]) for i in r.gold_ids}
    near = [i for i, d in enumerate(r.documents) if i not in r.gold_ids
            and any(_near(subject(d), g) for g in gold)]
    assert len(near) >= min(12, len(r.documents) - len(gold))
    assert subject(r.documents[r.hops[-1][0]]) == subject(plain.documents[plain.hops[-1][0]])
    assert r.answer == plain.answer and r.question == plain.question
  with pytest.raises(ValueError, match="name_negatives must be an int >= 0"):
    generate(task, 3, 0, name_negatives=-1, **SMALL)


@pytest.mark.parametrize("task", ["fact_lookup", "multi_hop"])
def test_context_distractors_inject_each_card_among_near_namesakes(task):
  """Each hop injects its gold card among 0..n other cards, none injected twice, near-namesakes
  of the hop's subject first; the memory, hops and answer stay the default record's."""
  counts = set()
  for index in range(12):
    plain = generate(task, 5, index, name_negatives=8, **SMALL)
    r = generate(task, 5, index, name_negatives=8, context_distractors=3, **SMALL)
    assert (r.documents, r.hops, r.answer) == (plain.documents, plain.hops, plain.answer)
    assert plain.injections == () and len(r.injections) == len(r.hops)
    seen = set()
    for hop, inj in zip(r.hops, r.injections):
      extras = [i for i in inj if i not in hop]
      assert set(hop) <= set(inj) and len(extras) <= 3 and not seen & set(extras)
      assert not set(extras) & set(r.gold_ids)
      who = subject(r.documents[hop[-1]])
      near = {i for i, d in enumerate(r.documents) if i not in set(r.gold_ids) | seen
              and _near(subject(d), who)}
      assert sum(i in near for i in extras) == min(len(extras), len(near))
      seen.update(extras)
      counts.add(len(extras))
  assert counts == {0, 1, 2, 3}
  with pytest.raises(ValueError, match="context_distractors must be an int >= 0"):
    generate(task, 3, 0, context_distractors=-2, **SMALL)


@pytest.mark.parametrize("task", ["fact_lookup", "multi_hop"])
def test_miss_rounds_put_wrong_near_namesakes_before_each_hop(task):
  """With miss_rate = p each hop gets k wrong cards, P(k >= j) = p**j up to MAX_MISSES: never gold,
  never injected elsewhere, near-namesakes of the hop's subject first; the memory, hops, answer
  and injections stay the record's without misses, and p = 0 is that record itself."""
  counts = []
  for index in range(40):
    plain = generate(task, 5, index, name_negatives=8, context_distractors=1, **SMALL)
    assert generate(task, 5, index, name_negatives=8, context_distractors=1, miss_rate=0.0,
                    **SMALL) == plain
    r = generate(task, 5, index, name_negatives=8, context_distractors=1, miss_rate=0.5, **SMALL)
    assert (r.documents, r.hops, r.answer, r.injections) == (plain.documents, plain.hops,
                                                             plain.answer, plain.injections)
    used = {i for inj in r.injections for i in inj} | set(r.gold_ids)
    for hop, wrong in zip(r.hops, r.misses):
      assert not used & set(wrong) and len(set(wrong)) == len(wrong)
      who = subject(r.documents[hop[-1]])
      near = {i for i, d in enumerate(r.documents) if i not in used and _near(subject(d), who)}
      assert sum(i in near for i in wrong) == min(len(wrong), len(near))
      used.update(wrong)
      counts.append(len(wrong))
  assert set(counts) == set(range(tasks.MAX_MISSES + 1))
  for bad in (-0.1, 1.0, "0.2"):
    with pytest.raises(ValueError, match="miss_rate must be a number in"):
      generate(task, 3, 0, miss_rate=bad, **SMALL)


def test_miss_counts_follow_the_geometric_law():
  """Over a memory with cards to spare, P(k >= j) = p**j for j <= MAX_MISSES (4,000 draws)."""
  record = generate("fact_lookup", 1, 0, memory_tokens=4096, min_doc_tokens=16, max_doc_tokens=40)
  assert len(record.documents) > 3 * tasks.MAX_MISSES
  rng = np.random.default_rng(0)
  k = np.array([len(tasks._with_misses(rng, record, 0.4).misses[0]) for _ in range(4000)])
  for j in range(1, tasks.MAX_MISSES + 1):
    assert abs(np.mean(k >= j) - 0.4 ** j) < 0.025, j
  assert k.max() == tasks.MAX_MISSES
