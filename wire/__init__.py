"""What the server and its clients share: the run config both read, the message schema, the tensor codecs."""
