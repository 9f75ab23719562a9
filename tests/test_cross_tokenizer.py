"""Cross-tokenizer distillation: stage 1's text offsets (both backends), alignment and
vocabulary mapping between a byte-level BPE and a SentencePiece-style (▁ metaspace, byte
fallback) tokenizer built here from a small corpus, the fused losses against a dense float64
reference, identical tokenizers against the same-tokenizer loss, the refusals, and 1 rank = 2
ranks."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import precompute_config, run_cli, train_config, write_yaml
from helpers import synthetic_records
from pipeline.cache import open_cache, read_manifest
from pipeline.data.batch import collate
from pipeline.student.cross_tokenizer import (CrossTokenizerConverter, align_positions, boundaries, token_bytes,
                                              vocab_map)
from pipeline.student.cross_tokenizer_loss import cross_tokenizer_loss
from pipeline.student.losses import fused_linear_loss

CORPUS = ["The quick brown fox jumps over the lazy dog.\nHello world, hello there!",
          "Café déjà vu: the theory of everything, the end.", "the them then there these those"] * 30


def _byte_level(vocab: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|bos|>"], show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A",
                                                       special_tokens=[("<|bos|>", tok.token_to_id("<|bos|>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>")


def _metaspace(vocab: int = 200):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab + 256, special_tokens=["<unk>", "<s>"] + bytes_,
                                                        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def toks():
    return _byte_level(), _metaspace()


# ---------------------------------------------------------------- mapping and alignment

def test_token_bytes_normalise_both_marker_styles(toks):
    bl, sp = toks
    b_bl, b_sp = token_bytes(bl), token_bytes(sp)
    assert b_bl[bl.convert_tokens_to_ids("Ġthe")] == b" the" == b_sp[sp.convert_tokens_to_ids("▁the")]
    assert b_bl[bl.convert_tokens_to_ids("Ċ")] == b"\n" == b_sp[sp.convert_tokens_to_ids("<0x0A>")]
    assert b_bl[bl.convert_tokens_to_ids("<|bos|>")] == b"\0special:<|bos|>"
    assert b_sp[sp.convert_tokens_to_ids("é")] == "é".encode()


def test_vocab_map_maps_identical_strings_only_and_is_injective(toks):
    bl, sp = toks
    m = vocab_map(sp, bl)  # teacher: metaspace, student: byte-level
    assert m[sp.convert_tokens_to_ids("▁the")] == bl.convert_tokens_to_ids("Ġthe")
    newline = [i for i, j in enumerate(m) if j == bl.convert_tokens_to_ids("Ċ")]  # b"\n" on both sides
    assert len(newline) == 1 and token_bytes(sp)[newline[0]] == b"\n"
    if "\n" in sp.get_vocab():  # the ordinary token wins over its byte-fallback twin <0x0A>
        assert newline == [sp.convert_tokens_to_ids("\n")] and m[sp.convert_tokens_to_ids("<0x0A>")] == -1
    assert m[sp.convert_tokens_to_ids("<s>")] == -1  # different special tokens never map
    mapped = m[m >= 0]
    assert len(set(mapped.tolist())) == len(mapped)
    tb, sb = token_bytes(sp), token_bytes(bl)
    assert all(tb[i] == sb[j] for i, j in enumerate(m) if j >= 0)
    ident = vocab_map(bl, bl)
    assert (ident == np.arange(len(bl))).all()


def test_boundaries_skip_a_character_split_over_two_byte_tokens():
    # "é" as two byte tokens (both span character 0..1), then "x" (1..2)
    end, ok = boundaries(np.array([[0, 0], [0, 1], [0, 1], [1, 2]]))
    assert end.tolist() == [0, 1, 1] and ok.tolist() == [True, False, True]


def test_align_positions_on_hand_made_offsets():
    # teacher: <s> "▁Hello"(0,5) "▁world"(5,11) "!"(11,12); student: <bos> "He" "llo" "Ġ" "world" "!"
    t = np.array([[0, 0], [0, 5], [5, 11], [11, 12]])
    s = np.array([[0, 0], [0, 2], [2, 5], [5, 6], [6, 11], [11, 12]])
    sp, tp = align_positions(t, s, np.ones(3, bool), np.ones(5, bool))
    assert sp.tolist() == [0, 2, 4] and tp.tolist() == [0, 1, 2]  # boundaries 0, 5, 11
    sp, tp = align_positions(t, s, np.array([True, False, True]), np.ones(5, bool))
    assert sp.tolist() == [0, 4] and tp.tolist() == [0, 2]  # an invalid teacher position drops its pair


def test_alignment_on_real_tokenizers_pairs_equal_prefixes(toks):
    bl, sp = toks
    text = "Hello world, the quick fox.\nCafé déjà vu!"
    et, es = sp(text, return_offsets_mapping=True), bl(text, return_offsets_mapping=True)
    t_off, s_off = np.array(et["offset_mapping"]), np.array(es["offset_mapping"])
    sp_, tp_ = align_positions(t_off, s_off, np.ones(len(t_off) - 1, bool), np.ones(len(s_off) - 1, bool))
    # reference: every character offset where both tokenizations end a token (after the specials)
    def ends(off):
        return {int(e) for (a, e), (b, _) in zip(off[:-1], off[1:]) if b >= e}
    common = ends(t_off) & ends(s_off) | {0}
    assert sorted(int(s_off[p, 1]) for p in sp_) == sorted(common)
    for p, q in zip(sp_, tp_):  # the text before the two predicted tokens is the same
        assert s_off[p, 1] == t_off[q, 1]
    assert len(sp_) >= 6


def test_converter_maps_ids_and_keeps_teacher_values(toks):
    bl, sp = toks
    text = "the theory of the fox"
    enc = sp(text, return_offsets_mapping=True)
    T, k = len(enc["input_ids"]), 4
    rng = np.random.default_rng(0)
    ids = np.stack([rng.choice(len(sp), k, replace=False) for _ in range(T - 1)]).astype(np.int32)
    ids[:, 0] = sp.convert_tokens_to_ids("▁the")
    lp = np.sort(np.log(rng.dirichlet(np.ones(k + 1), T - 1)[:, :k]), axis=1)[:, ::-1].astype(np.float32)
    tail = np.log1p(-np.exp(lp).sum(1)).astype(np.float32)
    from pipeline.cache import CacheRecord
    rec = CacheRecord("x", np.array(enc["input_ids"], np.int32), np.ones(T, bool), ids, lp, tail, 0.0, text,
                      np.array(enc["offset_mapping"], np.int32))
    out = CrossTokenizerConverter(sp, bl)(rec)
    assert out.input_ids.tolist() == bl(text)["input_ids"]
    s_pos, t_pos = align_positions(rec.offsets, np.array(bl(text, return_offsets_mapping=True)["offset_mapping"]),
                                   rec.loss_mask[1:], out.loss_mask[1:])
    assert out.aligned.sum() == len(s_pos) > 0
    np.testing.assert_array_equal(out.topk_logprobs[s_pos], lp[t_pos])
    assert (out.topk_ids[s_pos][:, 0] == bl.convert_tokens_to_ids("Ġthe")).all() and out.mapped[s_pos][:, 0].all()
    assert np.isneginf(out.topk_logprobs[~out.aligned]).all()


# ---------------------------------------------------------------- losses

def _dense_reference(hidden, weight, ids, lp, tail, mapped, aligned, labels, alpha, tau, mode):
    """float64 dense loss with autograd: full softmax, explicit sorts (module formulas)."""
    z = hidden @ weight.t()
    ce = -torch.log_softmax(z, -1).gather(1, labels[:, None]).squeeze(1)
    logq = torch.log_softmax(z / tau, -1)
    q = logq.exp()
    live = ~torch.isneginf(lp)
    lpt, lt = lp, tail  # the cached values are at τ (the cache temperature: only τ = T_c is exact)
    zz = torch.logsumexp(torch.cat([lpt, lt[:, None]], -1), -1)
    p, pt = torch.where(live, (lpt - zz[:, None]).exp(), 0.0), (lt - zz).exp()
    D = []
    for n in range(len(z)):
        if not aligned[n]:
            D.append(z.new_zeros(()))
            continue
        M, U = live[n] & mapped[n], live[n] & ~mapped[n]
        if mode == "gold":
            pm, qm = p[n][M], q[n][ids[n][M]]
            pr, qr = 1 - pm.sum(), 1 - qm.sum()
            kl = (pm * (pm.log() - qm.log())).sum() + (pr * (pr.log() - qr.log()) if pr > 0 else 0.0)
            keep = torch.ones(len(q[n]), dtype=torch.bool)
            keep[ids[n][M]] = False
            qs = q[n][keep].sort(descending=True).values[: int(U.sum())]
            D.append(kl + (qs - p[n][U].sort(descending=True).values).abs().sum())
        else:
            c = int(live[n].sum())
            qs = q[n].sort(descending=True).values[:c]
            D.append((qs - p[n][live[n]].sort(descending=True).values).abs().sum() + (pt[n] - (1 - qs.sum())).abs())
    return alpha * ce.sum() + (1 - alpha) * tau**2 * torch.stack(D).sum()


def _toy_targets(N=12, V=40, k=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(V, 8, generator=g, dtype=torch.float64)
    ids = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(N)])
    logits = torch.randn(N, k + 1, generator=g, dtype=torch.float64) * 2
    lp_all = torch.log_softmax(logits, -1).sort(-1, descending=True).values
    lp, tail = lp_all[:, :k].clone(), torch.logsumexp(lp_all[:, k:], -1)
    lp[1, 4:] = -torch.inf  # padding slots
    mapped = torch.rand(N, k, generator=g) < 0.6
    mapped[2] = True
    aligned = torch.rand(N, generator=g) < 0.75
    aligned[:3] = True
    labels = torch.randint(0, V, (N,), generator=g)
    return hidden, weight, ids, lp, tail, mapped, aligned, labels


@pytest.mark.parametrize("mode", ["gold", "uld"])
@pytest.mark.parametrize("alpha,tau", [(0.0, 1.0), (0.5, 2.0)])
def test_fused_cross_tokenizer_loss_matches_dense_float64_reference(mode, alpha, tau):
    from pipeline.data.batch import LossTargets

    hidden, weight, ids, lp, tail, mapped, aligned, labels = _toy_targets()
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    t = LossTargets(labels, torch.arange(len(labels)) // 4, 3, ids, lp, tail, aligned, mapped)
    sums = cross_tokenizer_loss(h1, w1, None, t, alpha=alpha, temperature=tau, mode=mode, chunk_size=5,
                                cache_temperature=tau)
    if alpha < 1.0:  # another cache temperature: the tail mass at τ is not in the cache
        with pytest.raises(ValueError, match="loss.cross_tokenizer needs the teacher's tail mass"):
            cross_tokenizer_loss(h1, w1, None, t, alpha=alpha, temperature=tau, mode=mode, cache_temperature=tau * 2)
    sums.loss_sum.backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = _dense_reference(h2, w2, ids, lp, tail, mapped, aligned, labels, alpha, tau, mode)
    ref.backward()
    torch.testing.assert_close(sums.loss_sum, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-7, atol=1e-9)
    assert float(sums.distill_sum.sum()) > 0


def test_identical_tokenizers_gold_equals_the_same_tokenizer_loss():
    """Every position aligned and every id mapped to itself: KL_M is the bucket KL, nothing is
    unmapped, so gold is exactly loss.tail=bucket forward KL (values and gradients)."""
    V, k = 50, 6
    recs = synthetic_records(6, V, k, seed=3)
    batch = collate(recs)
    t = batch.targets()
    t.aligned, t.mapped = torch.ones_like(t.labels, dtype=torch.bool), torch.ones_like(t.topk_ids, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(len(t.labels), 8, generator=g, dtype=torch.float64)
    weight = torch.randn(V, 8, generator=g, dtype=torch.float64)
    out = []
    for fn in ("xtok", "same"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if fn == "xtok":
            s = cross_tokenizer_loss(h, w, None, t, alpha=0.3, temperature=1.0, mode="gold", chunk_size=7)
        else:
            s = fused_linear_loss(h, w, None, t, alpha=0.3, temperature=1.0, tail="bucket", chunk_size=7)
        s.loss_sum.backward()
        out.append((s.loss_sum, s.kl_sum, s.distill_sum, s.top1_agree, h.grad, w.grad))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_identical_tokenizer_conversion_is_the_identity(assets, tmp_path):
    """A record of a text-offsets cache converted with the cache's own tokenizer keeps its
    tokens, mask and targets; every valid position is aligned and every id mapped."""
    from pipeline.models import load_tokenizer

    cache = _offsets_cache(assets, tmp_path / "c", "parquet")
    reader = open_cache(cache)
    tok = load_tokenizer(assets["tokenizer"])
    conv = CrossTokenizerConverter(tok, tok, str(cache))
    n_same = 0
    for i in range(len(reader)):
        rec = reader[i]
        out = conv(rec)
        if out.input_ids.tolist() != rec.input_ids.tolist():
            continue  # a truncated sample's text can tokenize differently at its cut
        n_same += 1
        valid = rec.loss_mask[1:]
        assert (out.loss_mask == rec.loss_mask).all() and (out.aligned == valid).all()
        np.testing.assert_array_equal(out.topk_ids[valid], rec.topk_ids[valid])
        np.testing.assert_array_equal(out.topk_logprobs[valid], rec.topk_logprobs[valid])
        assert out.mapped[valid].all()
    assert n_same >= len(reader) // 2


# ---------------------------------------------------------------- stage 1 and the runs

def _offsets_cache(assets, path, backend, nproc: int = 1, **over):
    cfg = precompute_config(assets, path, **{"cache.text_offsets": True, "cache.backend": backend, **over})
    res = run_cli(["stages.precompute_teacher", "--config", str(write_yaml(path.parent / f"{path.name}.yaml", cfg))],
                  nproc=nproc)
    assert res.returncode == 0, res.stderr[-3000:]
    return path


@pytest.mark.parametrize("backend", ["parquet", "zarr"])
def test_stage1_stores_text_and_offsets(assets, caches, tmp_path, backend):
    from pipeline.models import load_tokenizer

    cache = _offsets_cache(assets, tmp_path / "c", backend)
    m = read_manifest(cache)
    assert m.text_offsets == "char" and m.tokenizer_fingerprint == read_manifest(caches["train"]).tokenizer_fingerprint
    tok = load_tokenizer(str(cache / "tokenizer"))
    reader = open_cache(cache)
    plain = open_cache(caches["train"])
    for i in range(len(reader)):
        rec, ref = reader[i], plain[plain.index_of(reader.sample_ids[i])]
        assert rec.offsets.shape == (len(rec.input_ids), 2)
        assert tok.decode(rec.input_ids, skip_special_tokens=True) == rec.text  # the spans are the text's
        wide = rec.offsets[:, 1] > rec.offsets[:, 0]
        assert rec.offsets[wide][0, 0] == 0 and rec.offsets[wide][-1, 1] == len(rec.text)
        np.testing.assert_array_equal(rec.topk_ids, ref.topk_ids)  # the targets are those of a plain cache
        assert ref.text is None and ref.offsets is None
    if backend == "parquet":
        names = pq.ParquetFile(next(cache.glob("part-*.parquet"))).schema_arrow.names
        assert "text" in names and "offsets" in names
        assert "text" not in pq.ParquetFile(next(caches["train"].glob("part-*.parquet"))).schema_arrow.names
    assert read_manifest(caches["train"]).text_offsets == "none"


def _student_dir(tmp_path):
    """The metaspace tokenizer (fit on the fixture corpus) and a tiny student of its vocabulary."""
    from pipeline.data.demo_corpus import llama_config

    d = tmp_path / "student"
    tok = _metaspace()
    tok.save_pretrained(d)
    llama_config(len(tok), 16, 2, 2, 1, 32).save_pretrained(d)
    return d


def test_refusals_name_the_key_and_both_tokenizers(assets, caches, tmp_path):
    student = _student_dir(tmp_path)
    cache = _offsets_cache(assets, tmp_path / "c", "parquet")
    base = train_config(assets, {"train": cache, "validation": cache}, tmp_path / "run", max_steps=2,
                        student={"path": str(student)})
    base["data"]["tokenizer"] = str(student)
    res = run_cli(["stages.train_student", "--config", str(write_yaml(tmp_path / "a.yaml", base))])
    err = res.stderr.strip().splitlines()[-1]
    assert res.returncode != 0 and "loss.cross_tokenizer" in err and str(student) in err
    assert read_manifest(cache).tokenizer_fingerprint in err
    plain = {**base, "data": {**base["data"], "train_cache": str(caches["train"]), "eval_cache": str(caches["validation"])},
             "loss": {"cross_tokenizer": "gold"}}
    res = run_cli(["stages.train_student", "--config", str(write_yaml(tmp_path / "b.yaml", plain))])
    err = res.stderr.strip().splitlines()[-1]
    assert res.returncode != 0 and "no text offsets" in err and str(caches["train"]) in err


@pytest.mark.parametrize("mode", ["gold", "uld"])
def test_one_rank_equals_two_ranks(assets, tmp_path, mode):
    """A cross-tokenizer run trains, logs the aligned fraction and mapped mass per sample, and
    2 ranks give the 1-rank loss logs (same global batches)."""
    from pipeline.losslog.reader import load_loss_logs

    student = _student_dir(tmp_path)
    cache = _offsets_cache(assets, tmp_path / "c", "parquet")
    logs = []
    for nproc in (1, 2):
        cfg = train_config(assets, {"train": cache, "validation": cache}, tmp_path / f"run{nproc}", max_steps=3,
                           eval_steps=3, micro_batch_size=2, grad_accum_steps=2 // nproc, student={"path": str(student)},
                           loss={"cross_tokenizer": mode, "alpha": 0.5})
        cfg["data"]["tokenizer"] = str(student)
        res = run_cli(["stages.train_student", "--config", str(write_yaml(tmp_path / f"t{nproc}.yaml", cfg))], nproc=nproc)
        assert res.returncode == 0, res.stderr[-3000:]
        t = load_loss_logs(tmp_path / f"run{nproc}", split="train").to_pandas().sort_values(["step", "sample_id"])
        logs.append(t.reset_index(drop=True))
    a, b = logs
    assert a["sample_id"].tolist() == b["sample_id"].tolist()
    assert (a["aligned_frac"] > 0.2).all() and (a["aligned_frac"] <= 1).all() and (a["mapped_mass"] > 0).all()
    for col in ("ce_sum", "kl_sum", "distill_sum", "aligned_frac", "mapped_mass"):
        np.testing.assert_allclose(a[col], b[col], rtol=2e-4, atol=1e-4)
