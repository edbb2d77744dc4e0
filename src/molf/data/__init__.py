"""molf.data"""
