"""Generation with a compressed causal LM: KV-cache capture form, decoding loop, ONNX with past/present."""
