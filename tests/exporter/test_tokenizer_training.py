"""exporter.tokenizer_training: deterministic byte-level BPE with BOS = 0 and EOS = 1, lossless on text."""

from __future__ import annotations

from dsv3_export.exporter.tokenizer_training import BOS, EOS, MAX_VOCAB, corpus_files, train_bpe, train_tokenizer


def test_preset_tokenizer_is_deterministic_and_lossless():
    tok = train_tokenizer(512)
    assert tok.token_to_id(BOS) == 0 and tok.token_to_id(EOS) == 1 and tok.get_vocab_size() <= 512
    text = "def main():\n    return 'héllo ✓'\n"
    assert tok.decode(tok.encode(text).ids) == text  # byte-level: any text round-trips
    assert train_tokenizer(512).to_str() == tok.to_str()
    assert train_tokenizer(10 * MAX_VOCAB).get_vocab_size() <= MAX_VOCAB


def test_train_bpe_on_given_files(tmp_path):
    files = corpus_files(max_bytes=20_000)
    assert files and all(f.suffix == ".py" for f in files) and files == sorted(files)
    a, b = train_bpe(files, 300), train_bpe(files, 300)
    assert a.to_str() == b.to_str() and a.token_to_id(EOS) == 1
