"""molf.analysis"""
