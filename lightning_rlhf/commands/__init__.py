"""What users run, each a thin layer over the layers below: ``sample``, ``score``, ``evaluate``, ``label`` (people
rank samples on a web page) and ``pipeline`` (the whole loop). ``lightning_rlhf.cli`` dispatches to them."""
