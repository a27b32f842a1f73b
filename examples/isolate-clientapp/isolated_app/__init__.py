"""isolated-app: a Flower app whose ClientApp work runs in short-lived children."""
