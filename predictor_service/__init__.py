"""Predictor service: forecasts each expert's load for the upcoming forward pass with
an SRU trained on the model's own routing traces, plus history baselines."""
