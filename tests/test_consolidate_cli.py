"""consolidate.py end to end on tiny folders: one point, sweeps with an eval command, LLaVA folders, errors."""

import json
import re
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import consolidate
from mllm_cl.consolidation import modelmix
from mllm_cl.model_folder import read_tensors, write_model_folder
from mllm_cl.spectral import sac


def tiny_pair(tmp_path, prefix=""):
    g = torch.Generator().manual_seed(4)
    old = {"w": torch.randn(12, 8, generator=g), "emb": torch.randn(20, 8, generator=g),
           "b": torch.randn(12, generator=g)}
    new = {k: v + torch.randn(v.shape, generator=g) for k, v in old.items()}
    (tmp_path / "tok").mkdir(exist_ok=True)
    (tmp_path / "tok" / "tokenizer.json").write_text('{"new": true}')
    write_model_folder(tmp_path / f"{prefix}old", old, {"which": "old"})
    write_model_folder(tmp_path / f"{prefix}new", new, {"which": "new"}, copy_from=tmp_path / "tok")
    return old, new


def test_single_point_round_trip(tmp_path, capsys):
    old, new = tiny_pair(tmp_path)
    consolidate.main([str(tmp_path / "old"), str(tmp_path / "new"), "--method", "sac", "--alpha", "0.3",
                      "--out", str(tmp_path / "out"), "--device", "cpu"])
    got = read_tensors(tmp_path / "out")
    expected = sac(old, new, 0.3, device="cpu")
    for k in old:
        torch.testing.assert_close(got[k], expected[k])
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == {"which": "new"}
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"new": true}'
    assert "decomposing the updates" in capsys.readouterr().out


def test_sweep_with_eval_command(tmp_path, capsys):
    old, new = tiny_pair(tmp_path)
    # The "evaluation": the mean of bias b (ModelMix-ed, so linear in alpha) and a constant task.
    script = ("import sys, json; from safetensors.numpy import load_file; "
              "b = load_file(sys.argv[1] + '/model.safetensors')['b']; "
              "json.dump({'bias_mean': {'acc': float(b.mean())}, 'const': {'acc': 50.0}}, open(sys.argv[2], 'w'))")
    command = f'{sys.executable} -c "{script}" {{model}} {{json}}'
    consolidate.main([str(tmp_path / "old"), str(tmp_path / "new"), "--sweep", "0:1:0.5", "--out",
                      str(tmp_path / "sweep"), "--eval-cmd", command, "--device", "cpu"])
    out = capsys.readouterr().out
    assert out.count("decomposing the updates") == 1  # the SVDs are computed once for the whole sweep
    summary = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [p["alpha"] for p in summary["points"]] == [0.0, 0.5, 1.0]
    assert [p["folder"] for p in summary["points"]] == ["alpha_0.00", "alpha_0.50", "alpha_1.00"]
    means = [p["results"]["bias_mean"] for p in summary["points"]]
    for alpha, mean in zip((0.0, 0.5, 1.0), means):
        assert mean == pytest.approx(float((old["b"] + alpha * (new["b"] - old["b"])).mean()), abs=1e-6)
    assert all(p["results"]["const"] == 50.0 for p in summary["points"])
    assert "bias_mean" in out and "const" in out and "50.00" in out  # the alpha x task table
    assert torch.equal(read_tensors(tmp_path / "sweep" / "alpha_0.00")["w"], old["w"])
    assert torch.equal(read_tensors(tmp_path / "sweep" / "alpha_1.00")["w"], new["w"])
    torch.testing.assert_close(read_tensors(tmp_path / "sweep" / "alpha_0.50")["w"],
                               sac(old, new, 0.5, device="cpu")["w"])


def test_comma_sweep_modelmix(tmp_path):
    old, new = tiny_pair(tmp_path)
    consolidate.main([str(tmp_path / "old"), str(tmp_path / "new"), "--method", "modelmix", "--sweep",
                      "0.1,0.25", "--out", str(tmp_path / "mm")])
    for alpha, name in ((0.1, "alpha_0.10"), (0.25, "alpha_0.25")):
        got = read_tensors(tmp_path / "mm" / name)
        for k, v in modelmix(old, new, alpha).items():
            assert torch.equal(got[k], v)


def test_parse_alphas():
    assert consolidate.parse_alphas("0:1:0.25") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert consolidate.parse_alphas("0,0.1,1") == [0.0, 0.1, 1.0]
    assert len(consolidate.parse_alphas("0:1:0.1")) == 11
    for bad in ("0:2:0.5", "a,b", "1:0:0.1", "0:1:0"):
        with pytest.raises(consolidate.ConsolidateError, match="--sweep"):
            consolidate.parse_alphas(bad)
    with pytest.raises(consolidate.ConsolidateError, match=r"--sweep '0:1:1e-12' gives 1000000000001 alphas; at most "
                       "1001"):  # refused at once: building that list would hang
        consolidate.parse_alphas("0:1:1e-12")


def test_llava_folder(tmp_path):
    llm_old, llm_new = tiny_pair(tmp_path, prefix="llm_")
    g = torch.Generator().manual_seed(5)
    proj_old = {"0.weight": torch.randn(8, 6, generator=g), "0.bias": torch.randn(8, generator=g)}
    proj_new = {k: v + torch.randn(v.shape, generator=g) for k, v in proj_old.items()}
    vision = {"encoder.weight": torch.randn(6, 6, generator=g)}
    for name, llm, proj in (("old", "llm_old", proj_old), ("new", "llm_new", proj_new)):
        folder = tmp_path / name
        folder.mkdir()
        (tmp_path / llm).rename(folder / "llm")
        save_file(proj, str(folder / "projector.safetensors"))
        write_model_folder(folder / "vision", vision, {"vision": name})
        (folder / "config.json").write_text(json.dumps({"model_type": "mllm_cl_llava", "projector": "linear",
                                                        "which": name}))
    consolidate.main([str(tmp_path / "old"), str(tmp_path / "new"), "--alpha", "0.2", "--out",
                      str(tmp_path / "out"), "--device", "cpu"])
    out = tmp_path / "out"
    def prefixed(llm, projector):
        return {**{f"llm/{k}": v for k, v in llm.items()}, **{f"projector/{k}": v for k, v in projector.items()}}

    expected = sac(prefixed(llm_old, proj_old), prefixed(llm_new, proj_new), 0.2, device="cpu")
    for k, v in read_tensors(out / "llm").items():
        torch.testing.assert_close(v, expected[f"llm/{k}"])
    for k, v in load_file(str(out / "projector.safetensors")).items():
        torch.testing.assert_close(v, expected[f"projector/{k}"])
    assert (out / "vision" / "model.safetensors").read_bytes() == \
        (tmp_path / "new" / "vision" / "model.safetensors").read_bytes()
    assert json.loads((out / "config.json").read_text())["which"] == "new"
    assert (out / "llm" / "tokenizer.json").is_file()


def refused(capsys, argv: list[str], pattern: str) -> None:
    """consolidate.py exits with 2 and one `consolidate.py: error: ...` line matching `pattern`, as the other
    scripts do."""
    assert consolidate.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("consolidate.py: error: ") and err.count("\n") == 1, err
    assert re.search(pattern, err), err


def test_bad_ranks_are_refused_by_the_parser(tmp_path, capsys):
    tiny_pair(tmp_path)
    for rank in ("0", "-3"):
        with pytest.raises(SystemExit) as exit_info:
            consolidate.main([str(tmp_path / "old"), str(tmp_path / "new"), "--rank", rank, "--out",
                              str(tmp_path / "x")])
        assert exit_info.value.code == 2
        assert f"consolidate.py: error: --rank must be a positive integer (the updates' largest rank), got {rank}" \
            in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_mismatched_folders_give_a_clear_error(tmp_path, capsys):
    tiny_pair(tmp_path)
    write_model_folder(tmp_path / "other", {"w": torch.zeros(12, 8)}, {})
    refused(capsys, [str(tmp_path / "old"), str(tmp_path / "other"), "--out", str(tmp_path / "x")],
            r"(?s)other.*keys in the old model but not the new one: \['b', 'emb'\]")
    refused(capsys, [str(tmp_path / "old"), str(tmp_path / "missing"), "--out", str(tmp_path / "x")],
            "config.json not found")
    assert not (tmp_path / "x").exists()


def test_nan_or_integer_weights_are_refused(tmp_path, capsys):
    old, _ = tiny_pair(tmp_path)
    write_model_folder(tmp_path / "ints", {k: v.round().to(torch.int32) for k, v in old.items()}, {"which": "ints"})
    refused(capsys, [str(tmp_path / "ints"), str(tmp_path / "ints"), "--out", str(tmp_path / "x")],
            r"ints: weight 'b' is torch.int32; model weights must be floating point")
    bad = dict(old, w=old["w"].clone().fill_(float("nan")))
    write_model_folder(tmp_path / "nan", bad, {"which": "nan"})
    refused(capsys, [str(tmp_path / "old"), str(tmp_path / "nan"), "--out", str(tmp_path / "x")],
            r"nan/model.safetensors: tensor 'w' holds NaN or inf values")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("key, part", [("prompt_pool_top_n", "an L2P prompt pool"), ("moelora", "MoELoRA experts")])
def test_a_model_with_parts_beside_its_weights_is_refused(tmp_path, capsys, key, part):
    tiny_pair(tmp_path)
    config = json.loads((tmp_path / "new" / "config.json").read_text())
    (tmp_path / "new" / "config.json").write_text(json.dumps({**config, key: {"rank": 4}}))
    refused(capsys, [str(tmp_path / "old"), str(tmp_path / "new"), "--out", str(tmp_path / "x")],
            f"new holds {part}.*ModelMix and SAC cannot mix")
    assert not (tmp_path / "x").exists()
