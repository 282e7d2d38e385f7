"""One LightningModule per file."""
