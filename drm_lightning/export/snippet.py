"""Three lines of plain ``transformers`` / ``peft`` Python that load a merged folder and classify one example.

Why generated: the report of a pipeline run ends with them, filled in with the run's own folder, task, labels and
an example from the task's data, so a reader can paste them into any Python with ``transformers`` (and ``peft``
for an adapter) and get the merged model's prediction, without drm_lightning. They follow the head format of
``docs/interop.md``: the head's tensors applied by hand to the backbone's last hidden state, or, for label-word
tasks (``decoder_lm``), each label word's log-likelihood after the prompt. One example needs no padding, so a plain
mean is the masked mean and the last position is the last token. Families without such a short form (vision,
seq2seq, multiple choice) get ``drm_lightning.load_task_model`` instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from drm_lightning.export.adapter import ADAPTER_CONFIG
from drm_lightning.task_vectors.format import read_meta


def _loader(folder: Path) -> tuple[str, str]:
    """``(import line, load expression)`` of the merged model: the folder itself, or the base plus the adapter."""
    if not (folder / ADAPTER_CONFIG).is_file():
        return "from transformers import AutoModel, AutoTokenizer", f"AutoModel.from_pretrained({str(folder)!r})"
    record = json.loads((folder / "merge.json").read_text())
    arch = str((record.get("adapter") or {}).get("architecture") or "AutoModel")
    base = json.loads((folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path") or record["base_model"]
    return (
        f"from transformers import {arch}, AutoTokenizer; from peft import PeftModel",
        f"PeftModel.from_pretrained({arch}.from_pretrained({str(base)!r}), {str(folder)!r})",
    )


def usage_lines(folder: str | os.PathLike[str], task: str, text: str, pair: str | None = None) -> list[str]:
    """The three lines for ``task`` of the merged ``folder`` (model or adapter), classifying ``text`` (+ ``pair``).

    The last line prints the predicted label and the logits (label-word tasks: the log-likelihoods).
    """
    folder = Path(folder)
    meta = read_meta(folder / "heads" / task)
    head = dict(meta.head)
    labels = list(meta.label_names)
    kind = head.get("type")
    imports, load = _loader(folder)
    inputs = f"tok({text!r}{'' if pair is None else ', ' + repr(pair)}, return_tensors='pt')"
    if meta.family == "decoder_lm" and not kind:
        imports = imports.replace("AutoModel,", "AutoModelForCausalLM,") if "AutoModel," in imports else imports
        load = load.replace("AutoModel.from_pretrained", "AutoModelForCausalLM.from_pretrained")
        return [
            f"import torch; {imports}",
            f"m, tok, labels = {load}, AutoTokenizer.from_pretrained({str(folder)!r}), {labels!r}; "
            f"ids, n = {inputs}.input_ids, len(tok('Answer:', add_special_tokens=False).input_ids)",
            "s = [m(torch.cat([ids, a], 1)).logits[0, ids.shape[1] - 1 : -1].log_softmax(-1).gather(1, a.T).sum()"
            ".item() for a in [torch.tensor([tok('Answer: ' + w, add_special_tokens=False).input_ids[n:]]) "
            "for w in labels]]; "
            "print(labels[s.index(max(s))], s)",
        ]
    if kind in ("encoder", "decoder"):
        pool = (
            {"cls": "[:, 0]", "mean": ".mean(1)"}.get(str(head.get("pooling")), "[:, -1]")
            if kind == "encoder"
            else "[:, -1]"
        )
        logits = (
            "torch.tanh(x @ h['dense.weight'].T + h['dense.bias']) @ h['out_proj.weight'].T + h['out_proj.bias']"
            if kind == "encoder"
            else "x @ h['score.weight'].T + h['score.bias']"
        )
        head_file = str(folder / "heads" / task / "head.safetensors")
        return [
            f"import torch; {imports}; from safetensors.torch import load_file",
            f"m, tok, h, labels = {load}, AutoTokenizer.from_pretrained({str(folder)!r}), "
            f"load_file({head_file!r}), {labels!r}",
            f"x = m(**{inputs}, output_hidden_states=True).hidden_states[-1]{pool}; z = ({logits})[0]; "
            "print(labels[int(z.argmax())], z.tolist())",
        ]
    return [
        "import drm_lightning  # this head type has no short plain form (docs/interop.md, 'Task heads')",
        f"model = drm_lightning.load_task_model({str(folder)!r}, {task!r})",
        "print(model.label_names)  # model(**inputs) -> logits, inputs as the task's datamodule builds them",
    ]
