"""Judging and rating what the stages produced: judges (reward functions, reward-model scores, the gold judge),
win rates and Bradley–Terry / Elo ratings with bootstrap intervals, and the pipeline's diagnosis table. Below the RL
layer (PPO imports a judge by path) and above the models it loads."""
