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


# The served model's host may have ~512 MB (Deta Space): a 25 MP PNG decodes to ~75 MB. JPEGs count at their
# reduced decode scale, so phone photos of any size pass.
MAX_IMAGE_PIXELS = 25_000_000
NAME_CHARS = 24  # file names in the table are cut to this, so a long name cannot push the answer off a phone
TABLE_COLUMNS = ["image", "answer", "sure"]  # short headers: four columns fit a phone

# After a prediction the answer sits below the input (far below on a phone): bring it into view.
SCROLL_TO_ANSWER = """() => {
  document.querySelector('#serve-label')?.scrollIntoView({behavior: 'smooth', block: 'start'});
}"""


def uploaded_image(**kwargs: Any) -> gr.Image:
    """A ``gr.Image`` (``type="filepath"``) that hands a file Gradio cannot open to the handler instead of failing
    before it: the handler decodes every file itself (bounded, ``core.predict_view.load_images``) and says in plain
    words why one cannot be used. Gradio's own checks on the upload (that it came from this visitor) have run by
    then. (The instance's method is replaced: a subclass would make Gradio write a type stub beside this file.)"""
    image = gr.Image(type="filepath", **kwargs)
    strict = image.preprocess

    def preprocess(payload: Any) -> Any:
        try:
            return strict(payload)
        except Exception:  # noqa: BLE001 - PIL's errors for a non-image, an empty file, a decompression bomb
            path = getattr(payload, "path", None)
            return str(path) if path else None

    image.preprocess = preprocess
    return image


def describe_model(predictor: Predictor) -> str:
    """Plain words: what the model tells apart."""
    classes = predictor.classes
    shown = ", ".join(classes[:12]) + (f" and {len(classes) - 12} more" if len(classes) > 12 else "")
    return (f"Upload a picture, paste one or use the webcam, and this model says which of its **{len(classes)} "
            f"classes** it shows: {text.md(shown)}.")


def model_details(predictor: Predictor, name: str) -> str:
    """The model's details, for the folded settings: what it is and what runs it, each in a few words."""
    info = predictor.info
    stored = ("INT8 (8-bit numbers: smaller, and often faster on a CPU)" if info.variant == "int8"
              else f"{text.md((info.variant or 'fp32').upper())} (full precision)")
    where = "this server's GPU" if predictor.provider != "CPUExecutionProvider" else "this server's CPU"
    return (f"**{text.md(name)}** is an image classifier fine-tuned from {text.md(info.backbone or 'a network')} (a "
            f"network pretrained on ImageNet photos); it looks at a {info.image_size}x{info.image_size}-pixel square "
            f"from the middle of each picture and is stored as {stored}. It runs on {where} with onnxruntime "
            f"({text.md(predictor.provider)}).")


def upload_path(file: Any) -> Path | None:
    """The server-side path of a Gradio upload (a path string or a FileData-like object; the first of a list), or
    None. Raises ``gr.Error`` when the file is gone or a link."""
    if isinstance(file, list | tuple):
        file = file[0] if file else None
    if file is None:
        return None
    path = Path(str(getattr(file, "path", None) or getattr(file, "name", None) or file))
    if not path.is_file() or path.is_symlink():
        raise gr.Error("The uploaded file could not be read; please upload it again.", title="Cannot read the image")
    return path


def upload_name(file: Any, path: Path) -> str:
    """The name the visitor's file had (a bare name, never a server path)."""
    return Path(getattr(file, "orig_name", None) or path.name).name


def _short(name: str) -> str:
    return name if len(name) <= NAME_CHARS else name[:NAME_CHARS - 1] + "…"


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
    """The Predict page of one model. ``predict`` is also the API (``/predict``: image, files, top_k): with files,
    they are classified (the answer shown is the first file's); without, the image."""
    k_max = min(MAX_TOP_K, len(predictor.classes))

    def classified(named: list[tuple[str, Any]], top_k: float) -> tuple:
        k = int(min(max(top_k or 1, 1), k_max))
        try:
            images = load_images(named, predictor, max_image_pixels=MAX_IMAGE_PIXELS)
            label, info, table, looked = classify(predictor, images, model_name, top_k=k)
        except Exception as exc:  # noqa: BLE001 - sorted by _error
            raise _error(exc) from None
        table = table.rename(columns={"prediction": "answer", "probability": "sure"})
        table["sure"] = [f"{p:.0%}" for p in table["sure"]]
        shown = [c for c in ["image", "answer", "sure", "fits a class?"] if c in table.columns]
        return label, info, table[shown], looked

    def predict(image: Any, files: Any, top_k: float) -> tuple:
        file_list = files if isinstance(files, list | tuple) else ([files] if files else [])
        if file_list:
            named = [(_short(upload_name(f, p)), p) for f in file_list if (p := upload_path(f)) is not None]
        elif image is None:
            named = []
        elif isinstance(image, str | os.PathLike):
            path = upload_path(image)
            named = [(_short(path.name), path)]
        else:  # a Python caller's decoded image
            named = [("image", image)]
        if not named:
            raise gr.Error("Upload an image (or paste one / use the webcam) to classify.", title="No image")
        return classified(named, top_k)

    def predict_example(top_k: float, event: gr.SelectData) -> tuple:
        """An example clicked: classified, and shown in the image box (by index: only the operator's files)."""
        if not isinstance(event.index, int) or not 0 <= event.index < len(examples or []):
            raise gr.Error("Pick one of the examples shown.", title="No image")
        path = Path(examples[event.index])
        return (*classified([(_short(path.name), path)], top_k), str(path))

    def cleared() -> tuple:  # a new request starts from an empty answer, so an error never sits on an old one
        return None, "", None, None

    with gr.Blocks(title=f"{model_name} · image classifier") as demo:
        gr.Markdown(f"## 🔎 Image classifier\n{describe_model(predictor)}", elem_id="serve-intro")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=300):
                image_in = uploaded_image(label="Image (upload, webcam or paste from the clipboard)", image_mode=None,
                                          sources=["upload", "webcam", "clipboard"], height=280,
                                          elem_id="serve-image")
                predict_btn = gr.Button("🔎 Predict", variant="primary", elem_id="serve-predict")
                if examples:  # a gallery, not gr.Examples: that one restyles the image box and drops its handling
                    example_box = gr.Gallery(examples, label="…or click one of these", columns=6, height=120,
                                             allow_preview=False, object_fit="contain", elem_id="serve-examples")
                with gr.Accordion("Classify several images at once", open=False):
                    files_in = gr.File(label="Images (each gets a row in the table)", file_count="multiple",
                                       file_types=["image"], type="filepath", elem_id="serve-files")
                with gr.Accordion("Settings and the model file", open=False):
                    top_k = gr.Slider(1, k_max, value=min(3, k_max), step=1, label="How many guesses to show",
                                      elem_id="serve-topk")
                    gr.Markdown(model_details(predictor, model_name))
                    gr.DownloadButton("⬇️ Download the model (.onnx)", value=str(predictor.model_path),
                                      elem_id="serve-download")
                    gr.Markdown("Use it in your own app: `python export/example_predict.py model.onnx image.jpg` "
                                "needs only onnxruntime, numpy and pillow.")
            with gr.Column(scale=1, min_width=300):
                label_out = gr.Label(num_top_classes=k_max, label="Prediction", elem_id="serve-label")
                info_out = gr.Markdown(label="details", elem_id="serve-info")
                looked = gr.Image(label="Where it looked", type="numpy", format="png", interactive=False, height=240,
                                  visible=predictor.explains, elem_id="serve-looked")
                headers = [*TABLE_COLUMNS, *(["fits a class?"] if predictor.explains else [])]
                table = gr.Dataframe(headers=headers, label="All images", interactive=False, wrap=True,
                                     column_widths=["34%", "26%", "16%", "24%"] if predictor.explains else None,
                                     elem_id="serve-table")  # widths that fit a phone's 326 px
        inputs, outputs = [image_in, files_in, top_k], [label_out, info_out, table, looked]

        def wire(trigger: Any, api_name: str | None = None) -> None:
            trigger(cleared, None, outputs, queue=False, api_visibility="private").then(
                predict, inputs, outputs, api_name=api_name, concurrency_limit=2,
                api_visibility="public" if api_name else "private").success(None, js=SCROLL_TO_ANSWER)

        wire(predict_btn.click, "predict")
        wire(image_in.upload)
        wire(files_in.upload)
        if examples:
            example_box.select(predict_example, [top_k], [*outputs, image_in], api_visibility="private",
                               concurrency_limit=2).success(None, js=SCROLL_TO_ANSWER)  # select data: on this event
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
