"""Reading and writing images, dataset folders and JSON, always atomically."""
