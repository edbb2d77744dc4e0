"""molf.optim"""
