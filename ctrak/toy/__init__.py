"""The toy world: synthetic shape/colour datasets (`worlds`), the tiny model builder (`tiny`)
and the trainer of the shipped toy models (`train`)."""
