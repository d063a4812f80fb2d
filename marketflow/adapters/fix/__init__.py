"""FIX 4.x: lean bytes codec (framing, fields, encoding) and the initiator session layer."""
