"""The camera: classifying a folder of frames with an exported model, and the export it runs."""
