"""The serving app: one exported model's Predict page, without torch.

``python app.py --model model.onnx`` (or ``TRANSFER_LAB_MODEL=model.onnx python app.py`` where a host cannot pass
flags) starts this instead of the lab. It imports gradio, onnxruntime, numpy, pillow, pandas and the runtime layer
only, so it installs from ``requirements-serve.txt`` and fits a host where torch cannot (Deta Space's micros: about
512 MB of memory and a 250 MB upload; see the ``Spacefile``). The launch options it shares with the lab live here,
so both parsers say the same thing.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

import gradio as gr

from core import text
from core.predict_view import classify, load_images
from core.runtime.errors import UserError, os_error_message
from core.runtime.images import is_image_file
from core.runtime.predictor import Predictor

log = logging.getLogger("transfer_lab.serve")

MODEL_ENV = "TRANSFER_LAB_MODEL"  # the model to serve, for hosts that cannot pass --model
EXAMPLES_ENV = "TRANSFER_LAB_EXAMPLES"
MAX_EXAMPLES = 12  # example images shown under the input; more would push the result off a phone's screen
MAX_TOP_K = 10


def default_port() -> int:
    """``GRADIO_SERVER_PORT``, else ``PORT`` (what hosting platforms such as Deta Space pass), else 7860."""
    for name in ("GRADIO_SERVER_PORT", "PORT"):
        value = os.environ.get(name, "").strip()
        if value:
            if not value.isdigit() or not 0 < int(value) < 65536:
                raise SystemExit(f"${name}={value!r} is not a port number (1-65535); set it to one or pass --port.")
            return int(value)
    return 7860


def add_launch_options(p: argparse.ArgumentParser) -> None:
    """The options the lab and the serving app share: where to listen, sharing, upload size, the model to serve."""
    on_space = bool(os.environ.get("SPACE_ID"))
    p.add_argument("--host", default="0.0.0.0" if on_space else "127.0.0.1",
                   help="address to listen on (default 127.0.0.1; 0.0.0.0 when env SPACE_ID is set, i.e. on "
                        "Hugging Face Spaces)")
    p.add_argument("--port", type=int, default=None,
                   help="port (default: env GRADIO_SERVER_PORT, else env PORT, else 7860)")
    p.add_argument("--share", action="store_true", help="create a public gradio.live link (off by default)")
    p.add_argument("--max-file-size", default="200mb", help="largest upload accepted (default 200mb)")
    p.add_argument("--model", default=None, metavar="MODEL.onnx",
                   help=f"serve only this exported model (a Predict page, without torch: installs from "
                        f"requirements-serve.txt) instead of the lab; default: env {MODEL_ENV}")
    p.add_argument("--examples", default=None, metavar="FOLDER",
                   help=f"with --model: example images to offer under the input (up to {MAX_EXAMPLES}; default: "
                        f"env {EXAMPLES_ENV})")


def serving_model(argv: list[str] | None) -> str | None:
    """The model ``argv`` (or ``TRANSFER_LAB_MODEL``) asks to serve, or None for the lab. Reads only ``--model``:
    the full parse comes after, with the parser of the mode chosen."""
    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument("--model", default=None)
    known, _ = probe.parse_known_args(argv)
    return known.model or os.environ.get(MODEL_ENV) or None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python app.py",
        description="Serve one exported Transfer Lab model: a page to classify uploaded, pasted or webcam images, "
                    "and the same as an API. Needs gradio, onnxruntime, numpy and pillow; not torch.")
    add_launch_options(p)
    args = p.parse_args(argv)
    args.model = args.model or os.environ.get(MODEL_ENV)
    args.examples = args.examples or os.environ.get(EXAMPLES_ENV) or None
    args.port = args.port or default_port()
    if not args.model:
        p.error(f"pass --model MODEL.onnx or set {MODEL_ENV}")
    return args


def load_predictor(model: str | os.PathLike[str], device: str = "auto") -> Predictor:
    """The served model, or SystemExit with what to do: this runs at start-up, for the operator."""
    path = Path(model).expanduser()
    if not path.is_file():
        raise SystemExit(f"--model {path}: no such file. Pass the model.onnx written by `python -m core train` or "
                         "downloaded from the lab's Export tab.")
    try:
        return Predictor(path, device=device)
    except UserError as exc:
        raise SystemExit(f"--model {path}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own load errors: not an ONNX file, a broken graph
        raise SystemExit(f"--model {path} cannot be loaded by onnxruntime ({type(exc).__name__}: "
                         f"{str(exc)[:300]}). Pass a model.onnx exported by this lab.") from None


def example_images(folder: str | os.PathLike[str] | None) -> list[str]:
    """Up to ``MAX_EXAMPLES`` image files of ``folder``, sorted by name ([] without a folder)."""
    if not folder:
        return []
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise SystemExit(f"--examples {root}: no such folder.")
    return [str(p) for p in sorted(root.iterdir()) if p.is_file() and is_image_file(p)][:MAX_EXAMPLES]


def describe_model(predictor: Predictor, name: str) -> str:
    """Plain words first: what the model tells apart, then its details."""
    info, classes = predictor.info, predictor.classes
    shown = ", ".join(classes[:12]) + (f" and {len(classes) - 12} more" if len(classes) > 12 else "")
    return (f"Upload a picture, paste one or use the webcam: this model says which of its **{len(classes)} "
            f"classes** it shows: {text.md(shown)}.\n\n"
            f"<sub>Model {text.md(name)} · backbone {text.md(info.backbone or '?')} · {info.image_size} px input · "
            f"{text.md(info.variant or 'fp32')} · runs on onnxruntime's **{text.md(predictor.provider)}**</sub>")


def _upload_path(file: Any) -> Path | None:
    """The server-side path of a Gradio upload (a path string or a FileData-like object), or None."""
    if file is None:
        return None
    path = Path(str(getattr(file, "path", None) or getattr(file, "name", None) or file))
    if not path.is_file() or path.is_symlink():
        raise gr.Error("The uploaded file could not be read; please upload it again.", title="Cannot read the image")
    return path


def _error(exc: BaseException) -> gr.Error:
    """A visitor's mistake shows its message (escaped: it may hold their file name); anything else is logged and
    shown without details."""
    if isinstance(exc, UserError):
        return gr.Error(text.html(exc, max_chars=1000), title=getattr(exc, "title", None) or "Prediction failed")
    if message := os_error_message(exc):
        log.warning("prediction: %s", exc)
        return gr.Error(text.html(message), title="Prediction failed")
    log.error("prediction failed", exc_info=exc)
    return gr.Error(f"Something went wrong on the server ({type(exc).__name__}); it has been logged.",
                    title="Prediction failed")


def build_serving_app(predictor: Predictor, model_name: str, examples: list[str] | None = None) -> gr.Blocks:
    """The Predict page of one model. ``predict`` is also the API (``/predict``: image, files, top_k)."""
    k_max = min(MAX_TOP_K, len(predictor.classes))

    def predict(image: Any, files: Any, top_k: float) -> tuple:
        file_list = files if isinstance(files, list | tuple) else ([files] if files else [])
        named = [] if image is None else [("image", image if not isinstance(image, str | os.PathLike)
                                           else _upload_path(image))]
        named += [(Path(getattr(f, "orig_name", None) or p.name).name, p)
                  for f in file_list if (p := _upload_path(f)) is not None]
        if not named:
            raise gr.Error("Upload an image (or paste one / use the webcam) to classify.", title="No image")
        k = int(min(max(top_k or 1, 1), k_max))
        try:
            label, info, table, looked = classify(predictor, load_images(named, predictor), model_name, top_k=k)
        except Exception as exc:  # noqa: BLE001 - sorted by _error
            raise _error(exc) from None
        return label, info, table, looked

    with gr.Blocks(title=f"{model_name} · Transfer Lab") as demo:
        gr.Markdown(f"## 🔎 Image classifier\n{describe_model(predictor, model_name)}", elem_id="serve-intro")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=300):
                image_in = gr.Image(label="Image (upload, webcam or paste from the clipboard)", type="filepath",
                                    image_mode=None, sources=["upload", "webcam", "clipboard"], height=280,
                                    elem_id="serve-image")
                if examples:
                    gr.Examples(examples, inputs=image_in, label="…or try one of these", examples_per_page=12)
                predict_btn = gr.Button("🔎 Predict", variant="primary", elem_id="serve-predict")
                with gr.Accordion("Classify several images at once", open=False):
                    files_in = gr.File(label="Images", file_count="multiple", file_types=["image"], type="filepath",
                                       elem_id="serve-files")
                with gr.Accordion("Settings and the model file", open=False):
                    top_k = gr.Slider(1, k_max, value=min(5, k_max), step=1, label="Classes to list per image (top-k)",
                                      elem_id="serve-topk")
                    gr.DownloadButton("⬇️ Download the model (.onnx)", value=str(predictor.model_path),
                                      elem_id="serve-download")
                    gr.Markdown("Use it without this app: `python export/example_predict.py model.onnx image.jpg` "
                                "needs only onnxruntime, numpy and pillow.")
            with gr.Column(scale=1, min_width=300):
                label_out = gr.Label(num_top_classes=k_max, label="Prediction", elem_id="serve-label")
                info_out = gr.Markdown(label="details", elem_id="serve-info")
                looked = gr.Image(label="Where it looked", type="numpy", format="png", interactive=False, height=240,
                                  visible=predictor.explains, elem_id="serve-looked")
                table = gr.Dataframe(label="All images", interactive=False, wrap=True, elem_id="serve-table")
        outputs = [label_out, info_out, table, looked]
        predict_btn.click(predict, [image_in, files_in, top_k], outputs, api_name="predict", concurrency_limit=2)
        image_in.upload(predict, [image_in, files_in, top_k], outputs, api_name=False, concurrency_limit=2)
    return demo


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    predictor = load_predictor(args.model)
    examples = example_images(args.examples)
    log.info("serving %s on %s (%s)", args.model, predictor.provider, ", ".join(predictor.providers))
    demo = build_serving_app(predictor, Path(args.model).name, examples)
    demo.queue(max_size=64)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, max_file_size=args.max_file_size,
                allowed_paths=[str(predictor.model_path.resolve()), *examples], theme=gr.themes.Soft(),
                footer_links=["api", "gradio"])
