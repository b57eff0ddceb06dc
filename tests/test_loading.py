"""Loading local Hugging Face checkpoints (safetensors, .bin, sharded, older NeoX layouts) and the
``python -m gptkernels generate`` command. Nothing is downloaded."""

from __future__ import annotations

import json

import pytest
import torch

from gptkernels.__main__ import main
from gptkernels.models import from_pretrained
from gptkernels.models.loading import find_tokenizer
from tests.helpers import DEVICE
from tests.hf_models import VARIANTS, hf_model, padded_batch


def save_checkpoint(hf, path, safe: bool) -> None:
    """HF's save_pretrained (safetensors), or the pytorch_model.bin layout older transformers wrote
    (transformers 5 writes safetensors only)."""
    if safe:
        hf.save_pretrained(path)
    else:
        hf.config.save_pretrained(path)
        torch.save(hf.state_dict(), path / "pytorch_model.bin")


def _same_logits(hf, ours, vocab):
    ids, _ = padded_batch(2, 9, vocab, seed=7)
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids, backend="torch")
    assert float((ref - got).abs().max()) <= 1e-4


@pytest.mark.parametrize("variant,safe", [("gpt2", True), ("gpt-neox-sequential-pct0.25", False),
                                          ("opt-post-ln", True), ("gpt-neo-window4", False)])
def test_from_pretrained_matches_hf(tmp_path, variant, safe):
    hf = hf_model(VARIANTS[variant])
    save_checkpoint(hf, tmp_path, safe)
    names = {p.name for p in tmp_path.iterdir()}
    assert ("model.safetensors" if safe else "pytorch_model.bin") in names
    ours = from_pretrained(tmp_path, dtype=torch.float32, device=DEVICE)
    assert ours.dtype == torch.float32 and ours.device.type == torch.device(DEVICE).type
    assert (ours.lm_head.weight is ours.tok_emb.weight) == ours.config.tie_word_embeddings
    _same_logits(hf, ours, ours.config.vocab_size)


def test_from_pretrained_sharded_and_dtype(tmp_path):
    hf = hf_model(VARIANTS["gpt-neox-parallel-pct0.5"])
    hf.save_pretrained(tmp_path, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = from_pretrained(tmp_path, device=DEVICE)  # dtype from config.json (float32)
    _same_logits(hf, ours, ours.config.vocab_size)
    half = from_pretrained(str(tmp_path), dtype="float16", device=DEVICE)
    assert half.dtype == torch.float16 and half.lm_head.weight.dtype == torch.float16


def test_from_pretrained_sharded_bin_and_saved_dtype(tmp_path):
    """pytorch_model-0000x-of-0000y.bin shards with their index (older transformers' layout), and
    the dtype config.json records (float16 here) as the default."""
    hf = hf_model(VARIANTS["opt-pre-ln-project"])
    hf.config.save_pretrained(tmp_path)
    sd = hf.state_dict()
    keys = sorted(sd)
    shards = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    for name, part in shards.items():
        torch.save({k: sd[k] for k in part}, tmp_path / name)
    weight_map = {k: name for name, part in shards.items() for k in part}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ours = from_pretrained(tmp_path, device=DEVICE)
    _same_logits(hf, ours, ours.config.vocab_size)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, dtype="float16")))
    assert from_pretrained(tmp_path, device=DEVICE).dtype == torch.float16


def test_from_pretrained_old_neox_checkpoint(tmp_path):
    """A transformers-4 era Pythia directory: rotary_pct/rotary_emb_base in config.json, the output
    embedding named embed_out, rotary inv_freq buffers in the weights."""
    d = VARIANTS["gpt-neox-sequential-pct0.25"]
    hf = hf_model(d)
    sd = {("embed_out.weight" if k == "lm_head.weight" else k): v for k, v in hf.state_dict().items()}
    sd["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(2)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(dict(d, rotary_emb_base=10000)))
    ours = from_pretrained(tmp_path, device=DEVICE)
    assert ours.config.rotary_dim == 4
    _same_logits(hf, ours, ours.config.vocab_size)


def _stray_weights(hf) -> dict:
    """Tensors under the model's own key names (layer-0 QKV, embeddings...) with other values: what
    an optimizer state or an adapter saved beside the checkpoint may look like."""
    return {k: torch.full_like(v, 0.5) for k, v in hf.state_dict().items()}


@pytest.mark.parametrize("safe", [True, False])
def test_from_pretrained_ignores_stray_files(tmp_path, safe):
    """Only the checkpoint's own weight files are read (as transformers reads them): a stray
    optimizer_extra.safetensors or *.bin beside model.safetensors / pytorch_model.bin changes
    nothing (it used to be merged in, replacing the real weights)."""
    from safetensors.torch import save_file

    hf = hf_model(VARIANTS["gpt2"])
    save_checkpoint(hf, tmp_path, safe)
    stray = {k: v.contiguous() for k, v in _stray_weights(hf).items() if "wte" not in k}
    save_file(stray, tmp_path / "optimizer_extra.safetensors")
    torch.save(stray, tmp_path / "pytorch_model_extra.bin")
    torch.save(stray, tmp_path / "training_args.bin")
    ours = from_pretrained(tmp_path, dtype=torch.float32, device=DEVICE)
    _same_logits(hf, ours, ours.config.vocab_size)
    from gptkernels.models.loading import weight_files

    assert [p.split("/")[-1] for p in weight_files(str(tmp_path))] == \
        ["model.safetensors" if safe else "pytorch_model.bin"]


def test_from_pretrained_index_names_the_shards(tmp_path):
    """With an index, exactly its shards are read: a stray shard-like file is ignored; a shard the
    index names but the directory lacks is an error naming it."""
    hf = hf_model(VARIANTS["gpt-neox-parallel-pct0.5"])
    hf.save_pretrained(tmp_path, max_shard_size="60KB")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in _stray_weights(hf).items()},
              tmp_path / "model-00099-of-00099.safetensors")
    ours = from_pretrained(tmp_path, device=DEVICE)
    _same_logits(hf, ours, ours.config.vocab_size)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    (tmp_path / first).unlink()
    with pytest.raises(FileNotFoundError, match=first):
        from_pretrained(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ValueError, match="model.safetensors.index.json"):
        from_pretrained(tmp_path)


def test_from_pretrained_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(tmp_path / "missing")
    (tmp_path / "config.json").write_text(json.dumps(VARIANTS["gpt2"]))
    with pytest.raises(FileNotFoundError, match="weights"):
        from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="path"):
        from_pretrained(42)
    with pytest.raises(TypeError, match="dtype"):
        from_pretrained(tmp_path, dtype="float8")


def test_from_pretrained_bad_files_are_named(tmp_path):
    """A broken config.json, a config field of the wrong type or value, and an unreadable weight
    file (safetensors or pickle) are errors naming the file (and the field)."""
    hf = hf_model(VARIANTS["gpt2"])
    hf.save_pretrained(tmp_path)
    cfg_file = tmp_path / "config.json"
    good = cfg_file.read_text()
    cfg_file.write_text(good[: len(good) // 2])  # truncated: was a bare JSONDecodeError
    with pytest.raises(ValueError, match="config.json.*not valid JSON"):
        from_pretrained(tmp_path)
    cfg_file.write_text("[1, 2]")
    with pytest.raises(ValueError, match="config.json.*JSON object"):
        from_pretrained(tmp_path)
    for field, value, error in [("n_head", 0, ValueError), ("n_layer", "2", TypeError)]:
        cfg_file.write_text(json.dumps(dict(json.loads(good), **{field: value})))
        with pytest.raises(error, match=f"'{field}'.*config.json"):
            from_pretrained(tmp_path)
    cfg_file.write_text(good)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="model.safetensors"):
        from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="pytorch_model.bin"):
        from_pretrained(tmp_path)
    torch.save([torch.zeros(2)], tmp_path / "pytorch_model.bin")  # loads, but not a state dict
    with pytest.raises(ValueError, match="pytorch_model.bin.*not a dict"):
        from_pretrained(tmp_path)


# --------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------


def test_cli_tiny(capsys):
    rc = main(["generate", "--tiny", "gpt-neox", "--prompt", "1 2 3", "--prompt", "4,5",
               "--max-new-tokens", "4", "--backend", "torch", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0
    lines = [ln for ln in out.splitlines() if "new tokens:" in ln]
    assert len(lines) == 2 and all(len(ln.split(":")[1].split()) == 4 for ln in lines)
    assert "tokens/s" in out
    with pytest.raises(SystemExit):
        main(["generate", "--tiny", "gpt2", "--prompt", "not ids", "--device", "cpu"])
    with pytest.raises(SystemExit):  # nothing to generate (and no timings to print)
        main(["generate", "--tiny", "gpt2", "--prompt", "1 2", "--max-new-tokens", "0", "--device", "cpu"])


def test_cli_checkpoint_with_tokenizer(tmp_path, capsys):
    import tokenizers  # a dependency of transformers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(128)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(tmp_path)
    hf_model(VARIANTS["opt-pre-ln-project"], device="cpu").save_pretrained(tmp_path)
    assert find_tokenizer(str(tmp_path)) is not None
    rc = main(["generate", "--model", str(tmp_path), "--prompt", "w5 w7 w9", "--max-new-tokens", "3",
               "--backend", "torch", "--device", "cpu", "--dtype", "float32", "--eos-token-id", "127"])
    out = capsys.readouterr().out
    assert rc == 0
    text = [ln for ln in out.splitlines() if "text:" in ln]
    assert len(text) == 1 and text[0].split("text: ")[1].startswith("w5 w7 w9")
