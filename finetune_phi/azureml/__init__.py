"""Azure ML target: settings, entities and the operations that submit them."""
