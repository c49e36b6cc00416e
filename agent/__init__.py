"""The station agent: frames in, anomaly scores, heat maps and crops out over MQTT, nothing lost."""

__version__ = "0.1.0"
