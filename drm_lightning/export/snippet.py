"""A few lines of plain ``transformers`` / ``peft`` Python that load a merged folder and classify one example.

Why generated: the report of a pipeline run and every merged folder's model card end with them, filled in with the
folder, a task, its labels and an example, so a reader can paste them into any Python with ``transformers`` (and
``peft`` for an adapter) and get the merged model's prediction without drm_lightning. They are the lines a user
would type: load the backbone and the tokenizer, load the task's head (``heads/<task>/head.safetensors``, format in
``docs/interop.md``), pool, apply the head with ``torch.nn.functional.linear``; for label-word tasks
(``decoder_lm``), score each label word's log-likelihood after the prompt. One example needs no padding, so a plain
mean is the masked mean and the last position is the last token. Families without such a short form (vision,
seq2seq, multiple choice) get ``load_task_model``, which is also the one-line alternative for every family.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from drm_lightning.interop.peft_adapter import ADAPTER_CONFIG
from drm_lightning.io.task_vector import read_meta

#: How an encoder head pools the backbone's last hidden state ``[1, L, h]`` of one unpadded example.
POOLING = {"cls": "[:, 0]  # the first token", "mean": ".mean(1)  # mean pooling"}


def _loader(folder: Path, name: str, causal: bool) -> tuple[list[str], list[str], bool]:
    """``(import lines, lines that load ``model``, whether it returns last_hidden_state)`` for the merged model: the
    folder itself, or the base plus the adapter."""
    auto = "AutoModelForCausalLM" if causal else "AutoModel"
    if not (folder / ADAPTER_CONFIG).is_file():
        return [f"from transformers import {auto}, AutoTokenizer"], [f"model = {auto}.from_pretrained({name!r})"], True
    record = json.loads((folder / "merge.json").read_text())
    arch = str((record.get("adapter") or {}).get("architecture") or auto)
    if causal and arch == "AutoModel":
        arch = auto
    base = json.loads((folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path") or record["base_model"]
    imports = [f"from transformers import {arch}, AutoTokenizer", "from peft import PeftModel"]
    load = [f"base = {arch}.from_pretrained({str(base)!r})", f"model = PeftModel.from_pretrained(base, {name!r})"]
    return imports, load, arch == "AutoModel" or (arch.endswith("Model") and not arch.endswith("LMHeadModel"))


def _alternative(name: str, task: str) -> str:
    """The one-line alternative with drm_lightning, as a comment (the lines themselves never import it)."""
    return f"# or, with drm_lightning.export.task_model: model = load_task_model({name!r}, {task!r})"


def usage_lines(
    folder: str | os.PathLike[str], task: str, text: str, pair: str | None = None, *, name: str | None = None
) -> list[str]:
    """The lines for ``task`` of the merged ``folder`` (model or adapter), classifying ``text`` (+ ``pair``).

    The last line prints the predicted label and the logits (label-word tasks: the log-likelihoods). ``name`` is how
    the lines name the folder (default: ``folder``), e.g. its final path while it is written into a temporary one.
    """
    folder = Path(folder)
    name = str(folder) if name is None else name
    meta = read_meta(folder / "heads" / task)
    head = dict(meta.head)
    labels = list(meta.label_names)
    kind = head.get("type")
    inputs = f"tok({text!r}{'' if pair is None else ', ' + repr(pair)}, return_tensors='pt')"
    if meta.family == "decoder_lm" and not kind:
        imports, load, _ = _loader(folder, name, causal=True)
        return [
            "import torch",
            *imports,
            "",
            *load,
            f"tok = AutoTokenizer.from_pretrained({name!r})",
            f"labels = {labels!r}",
            "",
            "def score(prompt, word):  # log-likelihood of the label word after the prompt",
            "    ids = tok(prompt, return_tensors='pt').input_ids",
            "    n = len(tok('Answer:', add_special_tokens=False).input_ids)",
            "    word = torch.tensor([tok('Answer: ' + word, add_special_tokens=False).input_ids[n:]])",
            "    logits = model(torch.cat([ids, word], 1)).logits[0, ids.shape[1] - 1 : -1]",
            "    return logits.log_softmax(-1).gather(1, word.T).sum().item()",
            "",
            "with torch.no_grad():",
            f"    scores = [score({text!r}, word) for word in labels]",
            "print(labels[scores.index(max(scores))], scores)",
            _alternative(name, task),
        ]
    if kind in ("encoder", "decoder"):
        imports, load, plain = _loader(folder, name, causal=False)
        last = "[:, -1]  # the last token"
        pool = POOLING.get(str(head.get("pooling")), last) if kind == "encoder" else last
        hidden = "model(**inputs, output_hidden_states=True).hidden_states[-1]"  # a model with its own output head
        call = "model(**inputs).last_hidden_state" if plain else hidden
        head_file = str(Path(name) / "heads" / task / "head.safetensors")
        if kind == "encoder":
            apply = [
                "    x = torch.tanh(linear(x, head['dense.weight'], head['dense.bias']))",
                "    logits = linear(x, head['out_proj.weight'], head['out_proj.bias'])[0]",
            ]
        else:
            apply = ["    logits = linear(x, head['score.weight'], head['score.bias'])[0]"]
        return [
            "import torch",
            "from safetensors.torch import load_file",
            "from torch.nn.functional import linear",
            *imports,
            "",
            *load,
            f"tok = AutoTokenizer.from_pretrained({name!r})",
            f"head = load_file({head_file!r})  # the task's head",
            f"labels = {labels!r}",
            "",
            "with torch.no_grad():",
            f"    inputs = {inputs}",
            f"    x = {call}{pool}",
            *apply,
            "print(labels[int(logits.argmax())], logits.tolist())",
            _alternative(name, task),
        ]
    return [
        "from drm_lightning.export.task_model import load_task_model  # no short plain form (docs/interop.md)",
        "",
        f"model = load_task_model({name!r}, {task!r})",
        "print(model.label_names)  # model(**inputs) -> logits, inputs as the task's datamodule builds them",
    ]
