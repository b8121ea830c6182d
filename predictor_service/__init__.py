"""Predictor service: forecasts each expert's load for the upcoming batch (SRU).

Not built yet: it arrives with the issue "Predictor service". The gateway runs
without forecasts until then.
"""
