"""The prediction service: serves each model's champion over the Vertex AI REST shape."""
