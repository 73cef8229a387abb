"""tools/model_sensitivity.py: no nudge moves nothing; a large nudge moves the logits."""

from tests.helpers import load_tool


def _tool():
    return load_tool("model_sensitivity")


def test_nudged_embeddings_move_the_logits_in_proportion():
    rows = _tool().main(["tiny", "--eps", "0,0.5", "--tokens", "16", "--threads", "1"])
    unmoved, moved = rows
    assert unmoved["top1_agreement"] == 1.0 and unmoved["kl_mean"] == 0.0 and unmoved["cosine_min"] > 1 - 1e-9
    assert moved["cosine_mean"] < 0.999 and moved["kl_mean"] > 1e-4
