"""Classify one image with an exported model, using only onnxruntime, numpy and Pillow.

    python example_predict.py model.onnx photo.jpg
"""

import json
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

model_path, image_path = sys.argv[1], sys.argv[2]
session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
meta = session.get_modelmeta().custom_metadata_map
classes = json.loads(meta["classes"])
size, resize = int(meta["image_size"]), int(meta["resize_size"])
resample = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}[meta["interpolation"]]

image = ImageOps.exif_transpose(Image.open(image_path))
if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:  # transparency over white
    image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
image = image.convert("RGB")
# The model's resize rule: shorter side to `resize_size`, centre-crop `image_size`, RGB uint8 NHWC.
w, h = image.size
scale = resize / min(w, h)
new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
image = image.resize((new_w, new_h), resample)
left, top = (new_w - size) // 2, (new_h - size) // 2
pixels = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)[None]

probabilities = session.run(["probabilities"], {"image": pixels})[0][0]
for i in np.argsort(-probabilities)[:3]:
    print(f"{classes[i]}\t{probabilities[i]:.4f}")

# Models exported with the explain outputs also say whether the image fits any class, and where the model looked.
if "ood_threshold" in meta:
    cam, score = session.run(["cam", "ood_score"], {"image": pixels})
    if score[0] > float(meta["ood_threshold"]):
        print("warning: this image looks unlike anything the model was trained on; the answer is a guess")
    where = cam[0, probabilities.argmax()]  # [h, w]: how much each region adds to the predicted class
    row, col = np.unravel_index(where.argmax(), where.shape)
    print(f"looked most at the region {row + 1},{col + 1} of a {where.shape[0]}x{where.shape[1]} grid (row, column)")
