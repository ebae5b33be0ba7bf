"""Browser front ends (Gradio, Streamlit) and the code they share."""
