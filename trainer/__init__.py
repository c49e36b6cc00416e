"""kdfleet trainer: data, models, training, evaluation, export."""
