"""molf.model"""
