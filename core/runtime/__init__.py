"""The runtime layer: everything an app needs to serve an exported ``model.onnx``, and nothing that imports torch.

- ``contract``: the ONNX contract (format name, input/output names) and the metadata every exported file
  carries, read and written here only;
- ``predictor``: ``Predictor`` (classify images, optionally under a time limit per call), ``OnnxFeatureExtractor``,
  ``PredictorCache``, the child-process model check (``check_model_file``: address-space and CPU-time limits);
- ``model_check``: the structural check of an uploaded model (operators, weights, shapes, cost), before it runs;
- ``providers``: execution-provider choice (CUDA / TensorRT / CPU), thread counts, session creation;
- ``devices``: the device and provider names (no onnxruntime import, for a CLI's ``--help``);
- ``images``: decoding any image file to RGB and the resize + centre-crop rule shared by training and serving;
- ``files``: atomic writes, the cache folder, file hashes;
- ``errors``: ``UserError``, the base of every error a user's input can cause.

Every other part of the project (``models``, ``export``, training, the app and the CLIs) sits above this layer;
nothing here imports them (``tests/test_layers.py`` checks both).
"""
