"""A task of a user's own for ``lightning-rlhf pipeline``: the Caesar shift (README, "Your own task: a worked
example"). ``make_data.py`` writes the files, ``judge.score`` scores a response."""
