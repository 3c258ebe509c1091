"""``drm-lightning merge --lam search --save_as adapter`` end to end: two LoRA experts fitted through the CLI on the
tiny tasks, λ (and a drop rate) chosen on validation, and the written PEFT adapter loaded by plain ``peft`` in a
fresh interpreter that never imports drm_lightning: merged into the base, it must give ``W_0 + λ·Δ_merged`` of the
chosen parameter set at the chosen λ.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from drm_lightning.cli import main
from drm_lightning.io.merged_delta import iter_merged_delta
from tests.helpers.recipes import QUIET_TRAINER
from tests.helpers.tiny_models import make_tiny_model
from tests.helpers.tiny_tasks import write_model_yaml, write_tiny_tasks

#: A fresh interpreter: the base with the adapter merged in by plain peft, its state dict written to a file.
PLAIN = textwrap.dedent(
    """
    import sys
    from peft import PeftModel
    from safetensors.torch import save_file
    from transformers import AutoModel
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(sys.argv[1]), sys.argv[2]).merge_and_unload()
    assert "drm_lightning" not in sys.modules
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, sys.argv[3])
    """
)


def _list(paths) -> str:
    return "[" + ",".join(str(p) for p in paths) + "]"


@pytest.fixture(scope="module")
def lora_experts(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny BERT and one LoRA expert (r=4 on query and value) per tiny task, fitted by ``drm-lightning fit``."""
    tmp = tmp_path_factory.mktemp("search_adapter")
    backbone = make_tiny_model("encoder", tmp / "tiny_bert")
    tasks = write_tiny_tasks(tmp / "data", sizes=(64, 32, 16))
    model_yaml = write_model_yaml(tmp, backbone)
    folders = []
    for task, task_yaml in tasks.items():
        folders.append(tmp / "tv" / task)
        args = ["fit", "--config", str(model_yaml), "--config", str(task_yaml), *QUIET_TRAINER]
        args += ["--model.lora", "{r: 4, alpha: 8, target_modules: [query, value]}", "--trainer.max_epochs=3"]
        assert main([*args, f"--trainer.default_root_dir={tmp}", f"--task_vector_dir={folders[-1]}"]) == 0
    return {"tmp": tmp, "backbone": backbone, "tasks": list(tasks.values()), "tv": folders}


def test_searched_adapter_loads_with_plain_peft_at_the_chosen_lambda(lora_experts: dict) -> None:
    tmp, backbone = lora_experts["tmp"], lora_experts["backbone"]
    out = tmp / "adapter"
    args = ["merge", "--task_vectors", _list(lora_experts["tv"]), "--output", str(out), "--method", "drm_v"]
    args += ["--params", "{drop_rate: [0.3, 0.7]}", "--lam", "search", "--lambdas", "[0.5, 1.0]"]
    args += ["--keep_delta", "true"]
    assert main([*args, "--tasks", _list(lora_experts["tasks"]), "--save_as", "adapter", "--device", "cpu"]) == 0
    search = json.loads((out / "lambda_search.json").read_text())
    record = json.loads((out / "merge.json").read_text())
    lam = search["best_lambda"]
    assert record["save_as"] == "adapter" and record["lam"] == lam
    chosen = next(v for v in search["variants"] if v["name"] == search["chosen"])
    assert record["params"]["drop_rate"] == chosen["values"]["drop_rate"]
    assert (out / "adapter_config.json").is_file() and not any(out.glob("model*.safetensors"))

    merged = tmp / "plain.safetensors"
    done = subprocess.run(
        [sys.executable, "-c", PLAIN, backbone, str(out), str(merged)], capture_output=True, text=True, timeout=300,
        cwd=tmp,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    got = load_file(str(merged))
    base = {}
    for shard in Path(backbone).glob("*.safetensors"):
        base.update(load_file(str(shard)))
    delta = dict(iter_merged_delta(Path(f"{out}_delta") / search["chosen"]))
    assert delta and any("query" in k for k in delta) and any("value" in k for k in delta)
    assert all(float(d.abs().max()) > 0 for d in delta.values())  # the experts moved every adapted weight
    for name, d in delta.items():
        key = next(k for k in (name, name.removeprefix("bert."), f"bert.{name}") if k in base)
        want = base[key].double() + lam * d.double()
        err = float((got[name].double() - want).norm() / want.norm())
        assert err < 1e-5, (name, err)
    untouched = [k for k in got if k not in delta and k in base and not torch.equal(got[k], base[k])]
    assert untouched == []  # nothing else moved
