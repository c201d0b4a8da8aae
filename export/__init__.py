"""lmsan.export: turn a Hugging Face encoder and a PV set into a torch-free ONNX bundle."""
