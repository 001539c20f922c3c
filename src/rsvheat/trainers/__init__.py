"""Lightning modules (training tasks) and the LightningCLI that drives them."""
