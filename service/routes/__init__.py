"""HTTP routes, one module per resource; thin: parse, hand to the model server, shape the reply."""
