"""molf.eval"""
