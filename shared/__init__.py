"""The common language of kdfleet: messages, topics, model packages, config and the numpy core."""
