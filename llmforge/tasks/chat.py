"""General conversation: greetings, who the assistant is, what it can and cannot do, thanks,
goodbyes, vague requests that need a clarifying question, and multi-turn follow-ups.

What a newcomer types first ("Hi! Who are you?") must get a sensible answer, so these turns are
trained like any task and graded by light checks: a greeting answers with a greeting and an
offer of help; "who are you" names an assistant; a vague request gets a question back; a
follow-up ("now add 5 to that") must use the number from the earlier turn. User utterances are
split between training and evaluation like every other pool (tasks/phrasing.py).
"""
from __future__ import annotations

import re

from llmforge.tasks.arithmetic import AddSub, calculator_answer
from llmforge.tasks.base import Item, Task, answer_text, last_int, say, user
from llmforge.tasks.phrasing import pick
from llmforge.tasks.safety import is_refusal

NAME = "llmforge"
INTRO = (f"I'm {NAME}, a small AI assistant. I can do arithmetic with a calculator, count and reverse "
         "letters, sort numbers, make JSON and answer Python questions.")

GREETINGS = ["Hi!", "Hello!", "Hey there!", "Good morning!", "Hi there.", "Hello, anyone there?", "Hey!",
             "Good evening!", "Howdy!", "Hiya!", "Greetings!", "Hello assistant.", "Hi, how are you?",
             "Hey, what's up?", "Good afternoon.", "Yo, hello!", "Morning!", "Hi hi!", "Hello friend!",
             "Hey, nice to meet you.", "Hello there!", "Hi, good to see you.", "Heya!", "Hello, is this thing on?",
             "Hi, hope you are well.", "Good day!", "Hey hey!", "Hi again.", "Hello, nice to meet you.", "Salutations!"]
GREETING_REPLIES = ["Hello! How can I help you today?", "Hi! What can I do for you?",
                    "Hey! I'm happy to help. What do you need?"]
WHO = ["Who are you?", "What are you?", "What's your name?", "Are you a human?", "Tell me about yourself.",
       "Introduce yourself.", "Are you a robot?", "What should I call you?", "Who made you?",
       "What kind of program are you?", "Are you ChatGPT?", "Hi, who is this?", "Who am I talking to?",
       "Are you a person or a bot?", "Describe yourself in a sentence.", "What is your job?",
       "Who am I chatting with?", "What is this assistant?", "Do you have a name?", "Are you an AI?",
       "Who is answering me?", "What exactly are you?", "Tell me who you are.", "Are you a real person?",
       "Which assistant is this?", "Say something about yourself."]
CAN_DO = ["What can you do?", "How can you help me?", "What are you good at?", "What do you know how to do?",
          "What tasks can you handle?", "What are your skills?", "Can you help me with math?",
          "What kinds of questions can you answer?", "What should I ask you?", "Are you useful?",
          "What can I use you for?", "List what you can do.",
          "What are you able to do?", "How could you help me today?", "What jobs can you do for me?",
          "What can you help with?", "Which things can you do?", "Tell me what you can do.",
          "What kind of help do you offer?", "What are you for?", "Show me what you can do.",
          "What do you do?"]
# things it cannot do, and the key word its answer must contain
CANNOT = [("Can you browse the web?", "internet"), ("Can you look things up online?", "internet"),
          ("Can you see pictures?", "text"), ("Can you read images?", "text"),
          ("Can you remember our last chat?", "remember"), ("Do you remember what I told you yesterday?", "remember"),
          ("Can you send an email for me?", "email"), ("Can you email my boss?", "email"),
          ("Can you check today's news?", "internet"), ("What's the weather today?", "internet"),
          ("Can you play music?", "text"), ("Can you make a phone call?", "text"),
          ("Can you search Google for me?", "internet"), ("Can you open a website?", "internet"),
          ("Can you look at this photo?", "text"), ("Can you hear me?", "text"),
          ("Do you recall our previous conversation?", "remember"), ("Will you remember this tomorrow?", "remember"),
          ("Could you send a message to my friend?", "email"), ("Can you mail this letter for me?", "email")]
CANNOT_REPLIES = {"internet": "No, I can't access the internet; I only know what I learned in training.",
                  "text": "No, I only read and write text.",
                  "remember": "No, I don't remember earlier chats; each conversation starts fresh.",
                  "email": "No, I can't send email, but I can help you write one."}
THANKS = ["Thanks!", "Thank you!", "Thanks a lot.", "Great, thank you.", "Cheers!", "Thanks, that helped.",
          "Awesome, thanks!", "Perfect, thank you so much.", "Much appreciated.", "Thank you kindly.",
          "Nice, thanks!", "That's great, thanks.",
          "Thank you so much!", "Thanks, you're great.", "Ok thanks.", "Thanks for the help!", "Many thanks!",
          "Cool, thank you.", "Thanks, perfect.", "Appreciate it, thanks!"]
THANKS_REPLIES = ["You're welcome! Anything else?", "You're welcome!", "Glad I could help!"]
BYES = ["Bye!", "Goodbye.", "See you later!", "That's all, bye.", "Good night!", "Talk to you later.",
        "I'm done, goodbye!", "Catch you later.", "Have a nice day!", "Bye for now.",
        "See ya!", "Goodbye for today.", "I have to go now, bye.", "Later!", "That is all for now, goodbye.",
        "Take care, bye!", "Signing off, bye.", "So long!"]
BYE_REPLIES = ["Goodbye! Have a great day.", "Bye! Come back any time.", "See you! Take care."]
VAGUE = ["Can you help me with something?", "I have a question.", "Sort these numbers.", "Reverse this word.",
         "Count the letters.", "I need help.", "Do the thing.", "Make it JSON.", "Can you calculate something?",
         "What is it?", "Help me with my homework.", "Fix this.", "Add them up.", "Translate it.",
         "Can you explain it?", "Check this for me.",
         "Can you do that thing?", "Help!", "Sort them.", "Calculate it.", "What about this one?",
         "Can you do it again?", "I need an answer.", "Tell me."]
VAGUE_REPLIES = ["Sure! What would you like me to do? Please give me the details.",
                 "Of course. Which one do you mean? Please share the details."]
FOLLOWUPS = ["Now add {c} to that.", "And if you add {c} more?", "What if I add {c}?", "Plus {c}?",
             "Add {c} to the result.", "OK, and that plus {c}?", "Now increase it by {c}.",
             "Then add another {c}.", "Great. Add {c} to it.", "What do I get with {c} more?",
             "Take that and add {c}.", "And after adding {c}?",
             "Add {c} to that number.", "Now plus {c}?", "What is that plus {c}?", "Increase that by {c}.",
             "And with {c} added?", "Add another {c}, please.", "Then plus {c}.", "Now add {c} more.",
             "What if you add {c} to it?", "Could you add {c} to the answer?"]

KINDS = ("greeting", "who", "can_do", "cannot", "thanks", "bye", "vague", "followup")


def _first_question(rng, split) -> tuple[list[dict], int]:
    """A solved earlier turn for thanks and follow-ups: an add/sub question of the same split,
    asked any of its ways and answered through the calculator. (With only "What is a + b?" the
    model added to the question's second number, not to the answer, when asked "What is 127
    plus 58?" and then "Now add 10 to that".)"""
    prompt, value, gold = AddSub().make(rng, split)
    return prompt + gold, value


class Chat(Task):
    name = "chat"
    max_new_tokens = 72     # the capabilities answer is the longest, ~64 tokens

    def make(self, rng, split):
        kind = rng.choice(KINDS)
        if kind == "greeting":
            return user(pick(rng, GREETINGS, split, "greet")), {"kind": kind}, say(rng.choice(GREETING_REPLIES))
        if kind == "who":
            return user(pick(rng, WHO, split, "who")), {"kind": kind}, say(INTRO)
        if kind == "can_do":
            return user(pick(rng, CAN_DO, split, "can_do")), {"kind": kind}, say(INTRO)
        if kind == "cannot":
            question, key = pick(rng, CANNOT, split, "cannot")
            return user(question), {"kind": kind, "key": key}, say(CANNOT_REPLIES[key])
        if kind == "thanks":
            earlier, _ = _first_question(rng, split)
            return earlier + user(pick(rng, THANKS, split, "thanks")), {"kind": kind}, say(rng.choice(THANKS_REPLIES))
        if kind == "bye":
            return user(pick(rng, BYES, split, "bye")), {"kind": kind}, say(rng.choice(BYE_REPLIES))
        if kind == "vague":
            return user(pick(rng, VAGUE, split, "vague")), {"kind": kind}, say(rng.choice(VAGUE_REPLIES))
        earlier, value = _first_question(rng, split)
        c = rng.randint(2, 99)
        follow = pick(rng, FOLLOWUPS, split, "followup").format(c=c)
        return earlier + user(follow), {"kind": kind, "value": value + c}, calculator_answer(f"{value}+{c}", value + c)

    def verify(self, item: Item, response) -> float:
        text = answer_text(response)
        low = text.lower()
        kind = item.reference["kind"]
        if not text or is_refusal(text) and kind not in ("cannot",):
            return 0.0
        if kind == "greeting":
            return float(bool(re.search(r"\b(hello|hi|hey|greetings)\b", low))
                         and bool(re.search(r"\b(help|can i do|need)\b", low)))
        if kind in ("who", "can_do"):
            return float("assistant" in low or NAME in low)
        if kind == "cannot":
            return float(low.startswith("no") and item.reference["key"] in low)
        if kind == "thanks":
            return float(bool(re.search(r"\b(welcome|glad|pleasure)\b", low)))
        if kind == "bye":
            return float(bool(re.search(r"\b(bye|goodbye|see you|take care)\b", low)))
        if kind == "vague":
            return float(text.rstrip().endswith("?") or "?" in text)
        return float(last_int(text) == item.reference["value"])
