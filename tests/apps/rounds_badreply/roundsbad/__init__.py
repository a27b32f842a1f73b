"""roundsbad: a wrongly shaped reply under the app's own FedAvg."""
