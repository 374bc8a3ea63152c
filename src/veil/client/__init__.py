"""The client: the obfuscator alone, exported for the device that holds the images.

    model.py     ClientModel: f as the store keeps it (uint8 or [0, 1] images in; integer codes or float16 out)
    onnxfile.py  the .onnx file: export with its metadata (fingerprint, shapes, bits, Veil's version), reading it back
                 checked, and running it with onnxruntime (no PyTorch weights)
    int8.py      an int8 client: onnxruntime static quantisation calibrated on the defender images
    parity.py    how far a client's output is from PyTorch's (codes equal, values on a rounding boundary, float error)
    export.py    `veil export`: the file written, read back and compared on the users' images
    attacked.py  a client file as the obfuscator `veil attack --client` attacks

A client never holds the classifier or the training reconstructor. It imports the models and the run
directory, never the store (the store imports it for `veil obfuscate --client`).
"""
