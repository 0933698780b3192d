"""`seekax demo`: a tiny DeepSeek-V3 trained and served with every seekax part (`main.main`)."""
