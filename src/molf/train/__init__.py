"""molf.train"""
