"""Expert server: holds the FFN weights of some logical experts and runs them for the gateway."""
