"""The teaching layer: the chapters' runs and figures, the widget explorer, the headless notebook runner, the static course site and the course's goals, questions and exercises."""
