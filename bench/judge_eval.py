"""Accuracy of the refusal judge on pyrit's human-labelled refusal data: bench/results/judge_eval.json."""

from common import write_result

from training.judge_eval import judge_accuracy

if __name__ == "__main__":
    write_result("judge_eval", judge_accuracy())
