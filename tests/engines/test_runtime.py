"""engines.runtime: loading a build (hash checks), forward, generation, sampling, `dsv3-export run`."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dsv3_export import engines
from dsv3_export.cli.main import main
from dsv3_export.core.errors import ExportError
from tests.helpers import assert_clean_error

PROMPT = [0, 17, 301, 42, 9, 255, 77]


@pytest.fixture(scope="module")
def engine(tiny_build):
    return engines.load(tiny_build, threads=1)


@pytest.fixture(scope="module")
def reference():
    from dsv3_export.exporter import load_reference

    return load_reference("tiny")


@pytest.fixture
def copy_build(tiny_build, tmp_path):
    def make(edit=None):
        d = tmp_path / "copy"
        shutil.copytree(tiny_build, d)
        if edit:
            edit(d)
        return d
    return make


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# ---- loading ----------------------------------------------------------------------------------------
def test_load(engine, tiny_build):
    assert engine.backend == "ort" and engine.config.vocab_size == 512
    assert engine.model_file == tiny_build / "model.onnx"
    assert engines.load(tiny_build).model_file.name == "model.onnx"
    assert engine.tokenizer is not None and engine.mtp_session is not None


def test_tampered_file_is_named(copy_build):
    def flip(d):
        data = bytearray((d / "model.onnx.data").read_bytes())
        data[len(data) // 2] ^= 0x01
        (d / "model.onnx.data").write_bytes(bytes(data))

    d = copy_build(flip)
    with pytest.raises(ExportError, match=r"model\.onnx\.data: sha256 does not match"):
        engines.load(d)
    assert_clean_error(cli("run", d, "--ids", "0,1,2"), "model.onnx.data", "sha256")


def test_missing_file_is_named(copy_build):
    d = copy_build(lambda d: (d / "mtp.onnx.data").unlink())
    assert_clean_error(cli("run", d, "--ids", "0,1,2"), "mtp.onnx.data", "missing")


# ---- forward ----------------------------------------------------------------------------------------
def test_forward_chains_the_cache(engine, reference):
    """Prefill all at once == prefill of a prefix then the rest through the cache; both == torch."""
    ids = np.array([PROMPT])
    logits, hidden, past = engine.forward(ids)
    assert logits.shape == (1, 7, 512) and hidden.shape == (1, 7, 64)
    assert [p.shape for p in past] == [(1, 7, engine.latent_dim)] * 3
    _, _, past4 = engine.forward(ids[:, :4])
    logits2, _, past2 = engine.forward(ids[:, 4:], past4)
    assert np.abs(logits2 - logits[:, 4:]).max() <= 1e-4 * np.abs(logits).max()
    with torch.no_grad():
        ref = reference(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(ref - logits).max() <= 1e-4 * np.abs(ref).max()
    with pytest.raises(ExportError, match="out of range"):
        engine.forward([[0, 512]])
    with pytest.raises(ExportError, match=r"past\[0\] must be"):
        engine.forward(ids, [p[:, :, :5] for p in past])


# ---- generation ---------------------------------------------------------------------------------------
def test_greedy_matches_reference(engine, reference):
    streamed = []
    r = engine.generate(PROMPT, max_new_tokens=32, stop=[], on_token=lambda row, t: streamed.append((row, t)))
    with torch.no_grad():
        want = reference.generate_greedy(torch.tensor([PROMPT]), 32)[0].tolist()
    if engine.config.eos_token_id in want:  # the comparison needs no stop in the way
        want = want[: want.index(engine.config.eos_token_id) + 1]
    assert r.ids == want
    assert streamed == [(0, t) for t in want]
    s = r.stats
    assert (s.batch, s.prompt_tokens, s.new_tokens) == (1, 7, len(want))
    assert s.prefill_seconds > 0 and s.decode_tokens_per_s > 0 and s.steps == len(want) - 1
    assert isinstance(r.text, str)
    print(f"tiny decode: {s.decode_tokens_per_s:.0f} tokens/s (1 thread), prefill {s.prefill_seconds * 1e3:.1f} ms")


def test_sampling_is_seeded(engine):
    kw = dict(max_new_tokens=24, temperature=1.0, top_p=0.95, top_k=50)
    a = engine.generate(PROMPT, seed=1, **kw).ids
    assert engine.generate(PROMPT, seed=1, **kw).ids == a
    assert engine.generate(PROMPT, seed=2, **kw).ids != a
    greedy = engine.generate(PROMPT, max_new_tokens=24).ids
    assert engine.generate(PROMPT, max_new_tokens=24, temperature=1.5, top_k=1, seed=3).ids == greedy
    # A tiny nucleus keeps only the most likely token: greedy too.
    assert engine.generate(PROMPT, max_new_tokens=24, temperature=1.0, top_p=1e-6, seed=4).ids == greedy


def test_min_p_through_the_api(engine):
    """min_p as a keyword or in SamplingParams: 1 keeps only the most likely token (greedy, where
    plain sampling at that temperature is not); a middle value draws only tokens it keeps, checked
    against the engine's own logits step by step."""
    from dsv3_export import SamplingParams
    from dsv3_export.engines.sampling import processed_probs

    greedy = engine.generate(PROMPT, max_new_tokens=16, stop=[]).ids
    hot = [engine.generate(PROMPT, max_new_tokens=16, temperature=2.0, seed=s, stop=[]).ids for s in (1, 2, 3)]
    assert any(ids != greedy for ids in hot)
    for s in (1, 2, 3):
        assert engine.generate(PROMPT, SamplingParams(max_tokens=16, temperature=2.0, min_p=1.0, seed=s),
                               stop=[]).ids == greedy
    params = SamplingParams(max_tokens=16, temperature=2.0, min_p=0.2, seed=5)
    ids = engine.generate(PROMPT, params, stop=[]).ids
    for i, token in enumerate(ids):
        logits, _, _ = engine.forward(np.array([PROMPT + ids[:i]]))
        p = processed_probs(logits[0, -1], params)
        assert p[token] > 0
        plain = processed_probs(logits[0, -1], params.replace(min_p=0.0))
        assert (p > 0).sum() <= (plain > 0).sum() and set(np.flatnonzero(p)) == set(
            np.flatnonzero(plain >= 0.2 * plain.max()))


def greedy_by_hand(engine, prompt, n, params):
    """Greedy decoding with penalties, one full forward per token, the penalties applied by hand."""
    from dsv3_export.engines.sampling import apply_penalties

    out = []
    for _ in range(n):
        logits, _, _ = engine.forward(np.array([prompt + out]))
        out.append(int(np.argmax(apply_penalties(logits[0, -1], params, prompt, out))))
    return out


def test_penalties_through_the_api_and_the_cli(engine, tiny_build):
    """Penalties change greedy decoding exactly as applying them by hand to the engine's logits does
    (from the scheduler's batched path and `run`'s flags), and leave a penalty-free run alone."""
    from dsv3_export import SamplingParams

    n = 40  # long enough for the unpenalized tokens to repeat
    params = SamplingParams(max_tokens=n, repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.3)
    want = greedy_by_hand(engine, PROMPT, n, params)
    got = engine.generate(PROMPT, params, stop=[]).ids
    assert got == want and got != engine.generate(PROMPT, max_new_tokens=n, stop=[]).ids
    batch = engine.generate([PROMPT, [0, 400, 3, 99]], params, stop=[]).ids
    assert batch[0] == want and batch[1] == greedy_by_hand(engine, [0, 400, 3, 99], n, params)
    r = cli("run", tiny_build, "--ids", ",".join(map(str, PROMPT)), "--max-new-tokens", n, "--repetition-penalty",
            1.3, "--presence-penalty", 0.4, "--frequency-penalty", 0.3)
    assert r.exit_code == 0 and r.stdout.strip() == engine.generate(PROMPT, params).text.strip(), r.output
    with pytest.raises(ExportError, match="not with speculative decoding"):
        engine.generate(PROMPT, params, speculative=True)


@pytest.mark.parametrize("kwargs,field", [({"seed": -1}, "seed"), ({"min_p": 2.0}, "min_p"),
                                          ({"top_k": -5}, "top_k"), ({"max_new_tokens": 0}, "max_tokens")])
def test_api_names_a_bad_sampling_field(engine, kwargs, field):
    from dsv3_export.engines.sampling import SamplingError

    with pytest.raises(SamplingError) as e:
        engine.generate(PROMPT, **kwargs)
    assert e.value.param == field
    with pytest.raises(ExportError, match="unknown sampling field"):
        engine.generate(PROMPT, min_q=0.5)


def test_batch_equals_alone(engine):
    other = [0, 400, 3, 99, 12, 250, 31]
    alone = [engine.generate(p, max_new_tokens=12, stop=[]).ids for p in (PROMPT, other)]
    batch = engine.generate([PROMPT, other], max_new_tokens=12, stop=[])
    assert batch.ids == alone and batch.stats.batch == 2 and batch.stats.new_tokens == 24
    assert isinstance(batch.text, list) and len(batch.text) == 2


def test_stop_tokens(engine):
    other = [0, 400, 3, 99, 12, 250, 31]
    full = engine.generate(PROMPT, max_new_tokens=16, stop=[]).ids
    other_full = engine.generate(other, max_new_tokens=16, stop=[]).ids
    # A token of PROMPT's continuation (first seen after a few steps) that `other`'s never emits.
    first, stop = next((i, t) for i, t in enumerate(full) if i >= 2 and t not in full[:i] and t not in other_full)
    r = engine.generate(PROMPT, max_new_tokens=16, stop=[stop])
    assert r.ids == full[: first + 1] and r.finish_reason == "stop"
    assert r.text == engine.decode(full[:first])
    assert engine.generate(PROMPT, max_new_tokens=16, stop=stop).ids == r.ids  # a single id works too
    # In a batch, a stopped row waits (padded) while the other finishes; neither changes.
    b = engine.generate([PROMPT, other], max_new_tokens=16, stop=[stop])
    assert b.ids == [full[: first + 1], other_full] and b.finish_reason == ["stop", "length"]
    assert b.stats.new_tokens == first + 1 + 16


def test_text_prompts(engine):
    r = engine.generate("Hello world", max_new_tokens=8)
    assert r.prompt_ids[0] == engine.config.bos_token_id
    assert r.prompt_ids == engine.tokenize("Hello world")
    texts = ["Hello world", "a much longer prompt than the first one"]  # different lengths: one batch
    batch = engine.generate(texts, max_new_tokens=4)
    assert batch.ids == [engine.generate(t, max_new_tokens=4).ids for t in texts]


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt=""), "empty prompt"),
    (dict(prompt=[]), "empty prompt"),
    (dict(prompt=[[1, 2], []]), "empty prompt"),
    (dict(prompt=[0, 512]), "out of range"),
    (dict(prompt=[0, -1]), "out of range"),
    (dict(prompt=[0, 1], max_new_tokens=1023), "max_seq_len 1024"),
    (dict(prompt=[0, 1], max_new_tokens=0), "max_tokens must be >= 1"),
    (dict(prompt=[0, 1], temperature=-1.0), "temperature"),
    (dict(prompt=[0, 1], top_p=0.0), "top_p"),
    (dict(prompt=[0, 1], top_k=-2), "top_k"),
    (dict(prompt=[[0, 1], [0, 2]], speculative=True), "batch 1"),
    (dict(prompt=3.5), "prompt"),
])
def test_bad_generate_arguments(engine, kwargs, match):
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ExportError, match=match):
        engine.generate(kwargs.pop("prompt"), **kwargs)


# ---- the CLI --------------------------------------------------------------------------------------------
def test_cli_run_streams_text(engine, tiny_build):
    r = cli("run", tiny_build, "--prompt", "Hello world", "--max-new-tokens", 12)
    assert r.exit_code == 0, r.output
    want = engine.generate("Hello world", max_new_tokens=12)
    assert r.stdout == "Hello world" + want.text + "\n"  # the prompt echoed, as llama-cli does
    quiet = cli("run", tiny_build, "--prompt", "Hello world", "--max-new-tokens", 12, "--no-echo", "--threads", 1)
    assert quiet.exit_code == 0 and quiet.stdout == want.text + "\n", quiet.output
    assert "new tokens" in r.stderr and "tokens/s" in r.stderr
    r = cli("run", tiny_build, "--ids", ",".join(map(str, PROMPT)), "--max-new-tokens", 6, "--temperature", 0.8,
            "--top-p", 0.9, "--seed", 5)
    assert r.exit_code == 0, r.output
    assert r.stdout == engine.generate(PROMPT, max_new_tokens=6, temperature=0.8, top_p=0.9, seed=5).text + "\n"


def test_cli_run_min_p(engine, tiny_build):
    """--min-p 1 keeps only the most likely token: the greedy text at any temperature and seed."""
    greedy = engine.generate("Hello world", max_new_tokens=10).text
    for seed in (1, 2):
        r = cli("run", tiny_build, "--prompt", "Hello world", "--no-echo", "--max-tokens", 10, "--temperature", 2.0,
                "--min-p", 1.0, "--seed", seed)
        assert r.exit_code == 0 and r.stdout == greedy + "\n", r.output
    r = cli("run", tiny_build, "--prompt", "Hello world", "--no-echo", "--max-new-tokens", 10, "--temperature", 2.0,
            "--min-p", 0.1, "--seed", 3)
    assert r.stdout == engine.generate("Hello world", max_new_tokens=10, temperature=2.0, min_p=0.1, seed=3).text + "\n"


def test_cli_run_ids_without_tokenizer(engine, copy_build):
    def drop_tokenizer(d):
        (d / "tokenizer.json").unlink()
        m = json.loads((d / "manifest.json").read_text())
        del m["files"]["tokenizer.json"]
        (d / "manifest.json").write_text(json.dumps(m))

    d = copy_build(drop_tokenizer)
    r = cli("run", d, "--ids", ",".join(map(str, PROMPT)), "--max-new-tokens", 5)
    assert r.exit_code == 0, r.output
    assert r.stdout.split() == [str(t) for t in engine.generate(PROMPT, max_new_tokens=5).ids]
    assert_clean_error(cli("run", d, "--prompt", "hi"), "no tokenizer.json")


@pytest.mark.parametrize("args, needle", [
    (["--ids", "0,5,512"], "token id 512"),
    (["--ids=-1,5"], "token id -1"),
    (["--prompt", ""], "empty prompt"),
    (["--ids", ""], "empty prompt"),
    (["--ids", "1,x"], "--ids"),
    (["--ids", "0,1", "--max-new-tokens", "2000"], "max_seq_len"),
    (["--prompt", "hi", "--speculative", "--max-new-tokens", "2000"], "max_seq_len"),
    (["--prompt", "hi", "--backend", "trt"], "TensorRT"),
    (["--prompt", "hi", "--ids", "1"], "exactly one"),
    (["--prompt", "hi", "--top-p", "1.5"], "top_p must be in (0, 1], got 1.5"),
    (["--prompt", "hi", "--min-p", "1.5"], "min_p must be in [0.0, 1.0], got 1.5"),
    (["--prompt", "hi", "--seed", "-1"], "seed must be in [0, 9223372036854775807], got -1"),
])
def test_cli_run_bad_input(tiny_build, args, needle):
    assert_clean_error(cli("run", tiny_build, *args), needle)


def test_cli_run_not_a_build(tmp_path):
    assert_clean_error(cli("run", tmp_path, "--prompt", "hi"), "manifest.json")
    assert_clean_error(cli("run", tmp_path / "nope", "--prompt", "hi"), "no such build directory")


def test_nan_weights_give_an_error_not_token_0(copy_build):
    """A weight file turned to NaN behind the hash check's back (check_files=False): generation stops
    with one clear error instead of emitting token 0 forever (plain, batched and speculative)."""
    def poison(d):
        data = d / "model.onnx.data"
        raw = bytearray(data.read_bytes())
        raw[: len(raw) // 4 * 4] = np.full(len(raw) // 4, np.nan, np.float32).tobytes()
        data.write_bytes(bytes(raw))

    broken = engines.load(copy_build(poison), check_files=False)
    for kwargs in ({}, {"temperature": 1.0}):
        with pytest.raises(ExportError, match="non-finite logits"):
            broken.generate([0, 5, 7], max_new_tokens=4, **kwargs)
    with pytest.raises(ExportError, match="non-finite logits"):
        broken.generate([[0, 5, 7], [0, 9]], max_new_tokens=4)
    with pytest.raises(ExportError, match="non-finite logits"):
        broken.generate([0, 5, 7], max_new_tokens=4, speculative=True)


def test_a_build_that_failed_verification_is_refused(copy_build):
    """The manifest's verdict (written by verify) keeps a failed build from running, with a pointer."""
    import json

    from dsv3_export.core.build_dir import MANIFEST, write_manifest

    def fail(d):
        manifest = json.loads((d / MANIFEST).read_text())
        manifest["verify"] = {"passed": False, "report": "verify/report.json"}
        info = {k: v for k, v in manifest.items() if k not in ("files", "format")}
        write_manifest(d, info)

    with pytest.raises(ExportError, match="failed verification.*report.md"):
        engines.load(copy_build(fail))


def test_an_old_build_with_saved_optimized_graphs_gets_a_hint(tiny_build):
    import json

    from dsv3_export.core.build_dir import Manifest
    from dsv3_export.engines.runtime import layout_hints

    m = json.loads((tiny_build / "manifest.json").read_text())
    assert layout_hints(Manifest(m)) == [] and engines.load(tiny_build).hints == []
    for name, g in m["engine"]["graphs"].items():  # as builds that saved model.ort.onnx recorded it
        g["optimized"] = name.replace(".onnx", ".ort.onnx")
    (hint,) = layout_hints(Manifest(m))
    assert "*.ort.onnx" in hint and "rebuild" in hint


# ---- stop strings -------------------------------------------------------------------------------------
def _a_stop_string(text: str) -> str:
    """A short piece from the middle of a generated text, whose first occurrence is past the start."""
    for i in range(3, len(text) - 3):
        piece = text[i:i + 3]
        if piece.strip() and text.index(piece) == i:
            return piece
    raise AssertionError(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("how", ["plain", "speculative", "batch"])
def test_stop_strings_end_the_text_before_them(engine, how):
    prompt = "the quick brown fox"
    whole = engine.generate(prompt, max_new_tokens=40)
    stop = _a_stop_string(whole.text)
    kwargs = {"speculative": True} if how == "speculative" else {}
    prompts = [prompt, "jumps over"] if how == "batch" else prompt
    result = engine.generate(prompts, max_new_tokens=40, stop_strings=[stop, "never appears \x00"], **kwargs)
    text, ids, reason = ((result.text[0], result.ids[0], result.finish_reason[0]) if how == "batch"
                         else (result.text, result.ids, result.finish_reason))
    assert text == whole.text[:whole.text.index(stop)]
    assert reason == "stop"
    assert ids == whole.ids[:len(ids)] and len(ids) < len(whole.ids)  # the same tokens, ended early
    if how == "batch":  # the other row is not cut by this row's stop
        alone = engine.generate("jumps over", max_new_tokens=40, stop_strings=[stop, "never appears \x00"])
        assert result.text[1] == alone.text


def test_cli_run_stop(tiny_build, engine):
    whole = engine.generate("the quick brown fox", max_new_tokens=30)
    stop = _a_stop_string(whole.text)
    r = cli("run", tiny_build, "--prompt", "the quick brown fox", "--max-tokens", "30", "--no-echo", "--stop", stop,
            "--stop", "never appears")
    assert r.exit_code == 0, r.output
    assert r.stdout == whole.text[:whole.text.index(stop)] + "\n"
