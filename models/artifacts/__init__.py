"""The artifact directory: manifest, save and load with checksums, ONNX export, the bundled models.
"""
