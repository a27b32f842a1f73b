"""roundsmulti: several messages per round."""
